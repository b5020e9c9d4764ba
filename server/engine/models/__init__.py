"""The model families the compact engine runs, one module each over the shared decoder in
base.py and its forward passes in passes.py. A family not listed here is served by the serial
fallback (server/engine/hf_runner.py)."""

from __future__ import annotations

from server.engine.models.attention import PROMPT_QUERY_BLOCK
from server.engine.models.base import (
    DecoderModel,
    LayerWeights,
    PromptChunk,
    RowScores,
    module_shapes,
)
from server.engine.models.exactness import WIDE_ROWS
from server.engine.models.gemma2 import Gemma2Model
from server.engine.models.gemma3 import Gemma3Model
from server.engine.models.llama import LlamaModel
from server.engine.models.phi3 import Phi3Model
from server.engine.models.qwen2 import Qwen2Model
from server.engine.models.qwen3 import Qwen3Model

FAMILIES: tuple[type[DecoderModel], ...] = (
    LlamaModel,
    Qwen2Model,
    Qwen3Model,
    Gemma2Model,
    Gemma3Model,
    Phi3Model,
)
MODEL_CLASSES: dict[str, type[DecoderModel]] = {
    model_type: family for family in FAMILIES for model_type in family.MODEL_TYPES
}


def model_class(config) -> tuple[type[DecoderModel] | None, str | None]:
    """The family that runs this config, or None and the reason none can."""
    family = MODEL_CLASSES.get(config.model_type)
    if family is None:
        return None, f"model_type {config.model_type!r} (supported: {', '.join(MODEL_CLASSES)})"
    reason = family.unsupported(config)
    return (None, reason) if reason else (family, None)


__all__ = [
    "FAMILIES",
    "MODEL_CLASSES",
    "PROMPT_QUERY_BLOCK",
    "WIDE_ROWS",
    "DecoderModel",
    "LayerWeights",
    "PromptChunk",
    "RowScores",
    "model_class",
    "module_shapes",
]
