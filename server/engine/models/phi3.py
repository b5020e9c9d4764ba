"""Phi-3 / Phi-3.5 / Phi-4-mini: the checkpoint fuses q/k/v (`qkv_proj`) and gate/up
(`gate_up_proj`) itself, in the engine's column order, so PEFT adapters target those names and
each fused group is one LoRA module; a partial rotary factor turns only the first features."""

from __future__ import annotations

from typing import ClassVar

from server.engine.models.base import DecoderModel, LayerWeights, LinearFactory


class Phi3Model(DecoderModel):
    MODEL_TYPES = ("phi3",)
    LORA_GROUPS: ClassVar[dict[str, tuple[str, ...]]] = {
        "qkv": ("qkv_proj",),
        "o": ("o_proj",),
        "gate_up": ("gate_up_proj",),
        "down": ("down_proj",),
    }

    @classmethod
    def unsupported(cls, config) -> str | None:
        rope = getattr(config, "rope_parameters", None) or {}
        if rope.get("rope_type", "default") == "longrope":
            # its factors switch with the sequence length; the tables here are fixed
            return "longrope rotary scaling (Phi-3 128k variants)"
        return super().unsupported(config)

    def layer_weights(self, index: int, layer, linear: LinearFactory, prefix: str) -> LayerWeights:
        attn, mlp = layer.self_attn, layer.mlp
        return LayerWeights(
            input_norm=self.norm_weight(layer.input_layernorm),
            qkv=linear((f"{prefix}.self_attn.qkv_proj", attn.qkv_proj)),
            o=linear((f"{prefix}.self_attn.o_proj", attn.o_proj)),
            mlp_norm=self.norm_weight(layer.post_attention_layernorm),
            gate_up=linear((f"{prefix}.mlp.gate_up_proj", mlp.gate_up_proj)),
            down=linear((f"{prefix}.mlp.down_proj", mlp.down_proj)),
            window=self.layer_window(index),
        )
