"""Gemma 2 (`gemma2`; Google's Japanese gemma-2-2b-jpn-it among them): Gemma 3's layer
(embeddings scaled by sqrt(hidden), (1 + w) RMSNorms in float32 around both the attention and
the MLP, a GELU-tanh GLU, interleaved sliding-window and global layers, `query_pre_attn_scalar`
as the attention scale) without per-head q/k norms, with one rotary table for every layer,
and with the attention scores soft-capped (tanh(s / cap) * cap before the mask:
`DecoderModel.attn_softcap`, applied on torch's attention route, which the CPU attention
kernels leave to it)."""

from __future__ import annotations

from server.engine.models.base import DecoderModel, LayerWeights, LinearFactory
from server.engine.models.gemma3 import Gemma3Model
from server.engine.models.llama import llama_projections


class Gemma2Model(Gemma3Model):
    MODEL_TYPES = ("gemma2",)

    @staticmethod
    def text_config(config):
        return config

    @staticmethod
    def decoder(hf_model):
        return hf_model.model

    def rotary_tables(self, hf_model, inner, length: int):
        """One table: Gemma 2's layers share their rotary embedding."""
        return DecoderModel.rotary_tables(self, hf_model, inner, length)

    def layer_weights(self, index: int, layer, linear: LinearFactory, prefix: str) -> LayerWeights:
        return LayerWeights(
            input_norm=self.norm_weight(layer.input_layernorm),
            mlp_norm=self.norm_weight(layer.pre_feedforward_layernorm),
            window=self.layer_window(index),
            attn_out_norm=self.norm_weight(layer.post_attention_layernorm),
            mlp_out_norm=self.norm_weight(layer.post_feedforward_layernorm),
            **llama_projections(layer, linear, prefix),
        )
