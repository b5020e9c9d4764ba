"""Gemma 3 text stack (`gemma3_text`, and the text half of `gemma3`): embeddings scaled by
sqrt(hidden), RMSNorms of weight (1 + w) applied in float32, norms around both the attention
and the MLP, per-head q/k norms, a GELU-tanh GLU, interleaved sliding-window (local) and
global layers with rotary tables of their own, and `query_pre_attn_scalar` as the attention
scale."""

from __future__ import annotations

import torch

from server.engine.models.base import DecoderModel, LayerWeights, LinearFactory
from server.engine.models.llama import llama_projections


class Gemma3Model(DecoderModel):
    MODEL_TYPES = ("gemma3_text", "gemma3")

    @classmethod
    def unsupported(cls, config) -> str | None:
        config = cls.text_config(config)
        if getattr(config, "attention_bias", False):  # llama_projections reads no biases
            return "attention biases"
        if getattr(config, "use_bidirectional_attention", False):
            return "bidirectional attention"
        return super().unsupported(config)

    @staticmethod
    def text_config(config):
        return config.get_text_config()

    @staticmethod
    def decoder(hf_model):
        inner = hf_model.model
        return getattr(inner, "language_model", inner)  # the multimodal wrapper nests it

    def embedding(self, inner) -> torch.Tensor:
        # Gemma3TextScaledWordEmbedding: the row times sqrt(hidden) rounded to the dtype
        weight = inner.embed_tokens.weight.detach().to(self.dtype)
        scale = torch.tensor(inner.embed_tokens.scalar_embed_scale).to(self.dtype)
        return (weight * scale).contiguous()

    def norm_weight(self, norm: torch.nn.Module) -> torch.Tensor:
        """Gemma3RMSNorm: normalized in float32, times (1 + w) in float32, one rounding; a
        float32 weight makes _rms_norm do exactly that on bf16 rows too."""
        weight = 1.0 + norm.weight.detach().float()
        return torch.cat((weight, weight)).contiguous()

    def attention_scale(self) -> float:
        return self.config.query_pre_attn_scalar**-0.5

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
        return LayerWeights(
            input_norm=self.norm_weight(layer.input_layernorm),
            mlp_norm=self.norm_weight(layer.pre_feedforward_layernorm),
            window=self.layer_window(index),
            rope=self.config.layer_types[index],
            q_norm=self.norm_weight(attn.q_norm),
            k_norm=self.norm_weight(attn.k_norm),
            attn_out_norm=self.norm_weight(layer.post_attention_layernorm),
            mlp_out_norm=self.norm_weight(layer.post_feedforward_layernorm),
            **llama_projections(layer, linear, prefix),
        )
