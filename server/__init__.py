"""OpenAI-compatible serving: HTTP -> protocol models -> engine -> model/adapters -> tokens."""
