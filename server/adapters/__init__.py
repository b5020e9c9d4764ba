"""LoRA adapters: where they may live, how they are validated and loaded, which are active."""
