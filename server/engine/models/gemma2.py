"""Gemma 2 (`gemma2`; Google's Japanese gemma-2-2b-jpn-it among them): the Gemma layer
(gemma.py) with one rotary table for every layer, no per-head q/k norms, and the attention
scores soft-capped (tanh(s / cap) * cap before the mask: `DecoderModel.attn_softcap`, applied
on torch's attention route, which the CPU attention kernels leave to it)."""

from __future__ import annotations

from server.engine.models.base import LayerWeights, LinearFactory
from server.engine.models.gemma import GemmaFamily


class Gemma2Model(GemmaFamily):
    MODEL_TYPES = ("gemma2",)

    def layer_weights(self, index: int, layer, linear: LinearFactory, prefix: str) -> LayerWeights:
        return self.sandwich_layer(index, layer, linear, prefix)
