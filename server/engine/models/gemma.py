"""What Gemma 2 and Gemma 3 share (gemma2.py, gemma3.py): embeddings scaled by sqrt(hidden),
RMSNorms of weight (1 + w) applied in float32, norms around both the attention and the MLP
(the "sandwich"), a GELU-tanh GLU, interleaved sliding-window and global layers, and
`query_pre_attn_scalar` as the attention scale."""

from __future__ import annotations

from typing import Any

import torch

from server.engine.models.base import DecoderModel, LayerWeights, LinearFactory
from server.engine.models.llama import llama_projections


class GemmaFamily(DecoderModel):
    @classmethod
    def unsupported(cls, config) -> str | None:
        config = cls.text_config(config)
        if getattr(config, "attention_bias", False):  # llama_projections reads no biases
            return "attention biases"
        return super().unsupported(config)

    @classmethod
    def activation_name(cls, config) -> str:
        # Gemma*MLP reads `hidden_activation`; checkpoints may carry an older `hidden_act`
        return getattr(config, "hidden_activation", None) or super().activation_name(config)

    def embedding(self, inner) -> torch.Tensor:
        # Gemma*TextScaledWordEmbedding: the row times sqrt(hidden) rounded to the dtype
        weight = inner.embed_tokens.weight.detach().to(self.dtype)
        scale = torch.tensor(inner.embed_tokens.scalar_embed_scale).to(self.dtype)
        return (weight * scale).contiguous()

    def norm_weight(self, norm: torch.nn.Module) -> torch.Tensor:
        """Gemma's RMSNorm: normalized in float32, times (1 + w) in float32, one rounding; a
        float32 weight makes _rms_norm do exactly that on bf16 rows too."""
        weight = 1.0 + norm.weight.detach().float()
        return torch.cat((weight, weight)).contiguous()

    def attention_scale(self) -> float:
        return self.config.query_pre_attn_scalar**-0.5

    def sandwich_layer(
        self, index: int, layer, linear: LinearFactory, prefix: str, **extra: Any
    ) -> LayerWeights:
        """The layer with its four norms; `extra`: what a generation adds (rope, q/k norms)."""
        return LayerWeights(
            input_norm=self.norm_weight(layer.input_layernorm),
            mlp_norm=self.norm_weight(layer.pre_feedforward_layernorm),
            window=self.layer_window(index),
            attn_out_norm=self.norm_weight(layer.post_attention_layernorm),
            mlp_out_norm=self.norm_weight(layer.post_feedforward_layernorm),
            **extra,
            **llama_projections(layer, linear, prefix),
        )
