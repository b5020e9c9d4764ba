"""Qwen3 (dense): Llama's layer with a per-head RMSNorm on queries and keys before the
rotation, and Qwen's sliding-window layout."""

from __future__ import annotations

from server.engine.models.base import LayerWeights, LinearFactory
from server.engine.models.llama import LlamaModel


class Qwen3Model(LlamaModel):
    MODEL_TYPES = ("qwen3",)

    def layer_weights(self, index: int, layer, linear: LinearFactory, prefix: str) -> LayerWeights:
        weights = super().layer_weights(index, layer, linear, prefix)
        weights.q_norm = self.norm_weight(layer.self_attn.q_norm)
        weights.k_norm = self.norm_weight(layer.self_attn.k_norm)
        return weights
