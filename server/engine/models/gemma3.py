"""Gemma 3 text stack (`gemma3_text`, and the text half of `gemma3`): the Gemma layer
(gemma.py) with per-head q/k norms, and local and global layers with rotary tables of their
own."""

from __future__ import annotations

import torch

from server.engine.models.base import LayerWeights, LinearFactory
from server.engine.models.gemma import GemmaFamily


class Gemma3Model(GemmaFamily):
    MODEL_TYPES = ("gemma3_text", "gemma3")

    @classmethod
    def unsupported(cls, config) -> str | None:
        if getattr(cls.text_config(config), "use_bidirectional_attention", False):
            return "bidirectional attention"
        return super().unsupported(config)

    @staticmethod
    def text_config(config):
        return config.get_text_config()

    @staticmethod
    def decoder(hf_model):
        inner = hf_model.model
        return getattr(inner, "language_model", inner)  # the multimodal wrapper nests it

    def rotary_tables(
        self, hf_model, inner, length: int
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """One table per layer type (local layers: rope_local_base_freq; global: rope_theta
        with its scaling)."""
        positions = torch.arange(length, device=self.device)[None]
        probe = torch.zeros(1, device=self.device, dtype=torch.float32)
        tables = {}
        for kind in sorted(set(self.config.layer_types)):
            cos, sin = inner.rotary_emb(probe, positions, kind)
            tables[kind] = (cos[0], sin[0])
        return tables

    def layer_weights(self, index: int, layer, linear: LinearFactory, prefix: str) -> LayerWeights:
        attn = layer.self_attn
        return self.sandwich_layer(
            index,
            layer,
            linear,
            prefix,
            rope=self.config.layer_types[index],
            q_norm=self.norm_weight(attn.q_norm),
            k_norm=self.norm_weight(attn.k_norm),
        )
