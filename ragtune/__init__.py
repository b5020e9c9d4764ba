"""ragtune: hybrid RAG + fine-tuned LoRA inference server for company-internal knowledge."""

__version__ = "0.1.0"
