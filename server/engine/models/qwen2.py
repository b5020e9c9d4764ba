"""Qwen2 / Qwen2.5: Llama's layer with biases on q, k and v (not on o), and sliding windows
on the layers `max_window_layers` leaves them (when `use_sliding_window`)."""

from __future__ import annotations

import torch

from server.engine.models.base import LayerWeights, LinearFactory
from server.engine.models.llama import QKV_NAMES, LlamaModel


class Qwen2Model(LlamaModel):
    MODEL_TYPES = ("qwen2",)

    @classmethod
    def unsupported(cls, config) -> str | None:
        return super(LlamaModel, cls).unsupported(config)

    def layer_weights(self, index: int, layer, linear: LinearFactory, prefix: str) -> LayerWeights:
        weights = super().layer_weights(index, layer, linear, prefix)
        biases = [getattr(layer.self_attn, name).bias for name in QKV_NAMES]
        weights.qkv_bias = torch.cat([b.detach().to(self.dtype) for b in biases]).contiguous()
        return weights
