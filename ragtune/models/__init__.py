"""Base-model loading shared by server and training: bundled models, conversion, quantization."""

from ragtune.models.loader import LoadedModel, load_base_model, resolve_model_dir

__all__ = ["LoadedModel", "load_base_model", "resolve_model_dir"]
