"""Llama and Mistral (Llama 3 rope scaling and Mistral's sliding window included): the layout
the other families start from."""

from __future__ import annotations

from server.engine.linear import Linear
from server.engine.models.base import DecoderModel, LayerWeights, LinearFactory

QKV_NAMES = ("q_proj", "k_proj", "v_proj")
GATE_UP_NAMES = ("gate_proj", "up_proj")


def llama_projections(layer, linear: LinearFactory, prefix: str) -> dict[str, Linear]:
    """The four fused projections of a layer with Llama's module names (Gemma 3 shares them)."""
    attn, mlp = layer.self_attn, layer.mlp
    return {
        "qkv": linear(*((f"{prefix}.self_attn.{n}", getattr(attn, n)) for n in QKV_NAMES)),
        "o": linear((f"{prefix}.self_attn.o_proj", attn.o_proj)),
        "gate_up": linear(*((f"{prefix}.mlp.{n}", getattr(mlp, n)) for n in GATE_UP_NAMES)),
        "down": linear((f"{prefix}.mlp.down_proj", mlp.down_proj)),
    }


class LlamaModel(DecoderModel):
    MODEL_TYPES = ("llama", "mistral")

    @classmethod
    def unsupported(cls, config) -> str | None:
        if getattr(config, "attention_bias", False):  # Llama's puts a bias on o_proj too
            return "attention biases"
        return super().unsupported(config)

    def layer_weights(self, index: int, layer, linear: LinearFactory, prefix: str) -> LayerWeights:
        return LayerWeights(
            input_norm=self.norm_weight(layer.input_layernorm),
            mlp_norm=self.norm_weight(layer.post_attention_layernorm),
            window=self.layer_window(index),
            **llama_projections(layer, linear, prefix),
        )
