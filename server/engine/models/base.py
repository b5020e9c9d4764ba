"""The compact decoder forward every model family shares: batched decode and chunked prefill
over a slot KV cache, with the kernels (packed linears, masked attention, batched LoRA).

Why not the Hugging Face modules: their cache is per batch, not per sequence, so sequences
cannot join and leave a running batch, and their per-step Python overhead dominates on small
models. The weights come from the loaded Hugging Face model (quantized ones dequantized once to
the compute dtype), q/k/v and gate/up are fused into one GEMM each, and every attention call
uses the same masked path whether a row runs alone or in a batch, which keeps greedy outputs
independent of batch neighbours.

A family module (llama.py, qwen2.py, gemma3.py, ...) says how its checkpoint maps onto
`LayerWeights` and what differs in the arithmetic (norm weights, embedding scale, activation,
attention scale, rotary tables, sliding windows); the passes (passes.py) and a layer's
arithmetic (layer.py) are the same for all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from ragtune.models.checkpoint import open_checkpoint
from server.engine import attention_prompt
from server.engine.linear import Linear, dense_weight, head_linear, is_bnb, linear_for
from server.engine.lora import LLAMA_GROUPS
from server.engine.models.exactness import (
    describe_sharing,
    settle_wide_gemms,
)
from server.engine.models.layer import LayerArithmetic
from server.engine.models.passes import ForwardPasses, PromptChunk, RowScores
from server.engine.rms_norm import supported as rms_norm_supported

logger = logging.getLogger(__name__)

# Hugging Face activation names -> the function (ACT2FN's arithmetic)
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}
GLOBAL_ROPE = "global"


def doubled(norm_weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An RMSNorm weight as `DecoderModel._rms_norm` takes it: [weight, weight]."""
    weight = norm_weight.detach().to(dtype)
    return torch.cat((weight, weight)).contiguous()


@dataclass
class LayerWeights:
    """One decoder layer. The optional parts are what some families add to Llama's layer."""

    input_norm: torch.Tensor  # [2 * hidden], see doubled
    qkv: Linear  # [(heads + 2 * kv_heads) * head_dim, hidden]
    o: Linear  # [hidden, heads * head_dim]
    mlp_norm: torch.Tensor  # [2 * hidden] before the MLP
    gate_up: Linear  # [2 * intermediate, hidden]
    down: Linear  # [hidden, intermediate]
    window: int | None = None  # sliding window: the keys a query sees, itself included
    rope: str = GLOBAL_ROPE  # which rotary table (Gemma 3: local and global layers differ)
    qkv_bias: torch.Tensor | None = None  # Qwen2
    q_norm: torch.Tensor | None = None  # [2 * head_dim] per-head RMSNorm (Qwen3, Gemma 3)
    k_norm: torch.Tensor | None = None
    attn_out_norm: torch.Tensor | None = None  # on the attention output (Gemma 3)
    mlp_out_norm: torch.Tensor | None = None  # on the MLP output (Gemma 3)


# One layer's view of a projection: linear(name -> fused weight)
LinearFactory = Callable[..., Linear]


class DecoderModel(ForwardPasses, LayerArithmetic):
    """Weights plus the two forward passes the scheduler needs. Subclasses are the model
    families: they name their `model_type`s, their LoRA projection groups, and override the
    hooks below where their checkpoint or arithmetic differs from Llama's."""

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ()
    # fused projection group -> the PEFT module names inside it, in output-column order
    LORA_GROUPS: ClassVar[dict[str, tuple[str, ...]]] = LLAMA_GROUPS

    @classmethod
    def unsupported(cls, config) -> str | None:
        """None when this family's forward can run the model, else the reason it cannot."""
        activation = cls.activation_name(config)
        if activation not in ACTIVATIONS:
            return f"activation {activation!r}"
        if getattr(config, "mlp_bias", False):
            return "MLP biases"
        return None

    @classmethod
    def activation_name(cls, config) -> str:
        """The MLP's activation, read as the family's Hugging Face code reads it."""
        return getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", "silu")

    def __init__(
        self,
        hf_model,
        dtype: torch.dtype,
        device: str,
        weights: str = "dense",  # one of DECODE_WEIGHTS
        source_dir: Path | None = None,  # the model's checkpoint directory
        max_positions: int | None = None,  # the longest sequence served (rotary tables)
        row_blocks: bool = True,  # engine.prompt_row_blocks (exactness.settle_wide_gemms)
        prompt_attention: str = "auto",  # engine.prompt_attention (attention_prompt.resolve)
        team_may_shrink: bool = False,  # model.threads auto: the engine's team changes size
    ):
        config = self.text_config(hf_model.config)
        self.config = config
        self.dtype = dtype
        self.device = device
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.hidden = config.hidden_size
        self.intermediate = config.intermediate_size
        self.eps = config.rms_norm_eps
        # RMSNorm on ragtune's kernel (engine/rms_norm.py) where it runs
        self.norm_kernel = rms_norm_supported(device, dtype)
        self._kernel_norm_weights: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.vocab_size = config.vocab_size
        self.num_layers = config.num_hidden_layers
        self.activation = ACTIVATIONS[self.activation_name(config)]
        self.logit_softcap: float | None = getattr(config, "final_logit_softcapping", None)
        # attention scores soft-capped before the mask (Gemma 2): torch's route applies it
        self.attn_softcap: float | None = getattr(config, "attn_logit_softcapping", None)

        inner = self.decoder(hf_model)
        self.embed = self.embedding(inner)
        self.norm = self.norm_weight(inner.norm)
        self.weights = weights

        # Packed kinds quantize from the checkpoint when the loaded model is bitsandbytes-
        # quantized (see ragtune/models/checkpoint.py) or was loaded without its projections
        # (ragtune/models/skeleton.py); dense serves the loaded model as is.
        source = open_checkpoint(source_dir) if weights != "dense" else None

        def weight(name: str, module: torch.nn.Module) -> torch.Tensor:
            key = f"{name}.weight"
            unloaded = module.weight.is_meta
            if weights != "dense" and (is_bnb(module) or unloaded):
                stored = source.tensor(key) if source is not None and key in source else None
                shape = (module.out_features, module.in_features)
                if stored is not None and stored.is_floating_point() and stored.shape == shape:
                    return stored.to(device=device, dtype=dtype).contiguous()
                if not unloaded:  # absent, or pre-quantized (a bitsandbytes checkpoint)
                    logger.warning("%s: no float matrix in the checkpoint; packing bnb's", key)
            if unloaded:
                raise ValueError(
                    f"{key} was not loaded (model.quantization unloaded) and engine.weights="
                    f"{weights} does not read it from the checkpoint: load the whole model"
                )
            return dense_weight(module, dtype)

        def linear(*parts: tuple[str, torch.nn.Module]) -> Linear:
            fused = torch.cat([weight(name, module) for name, module in parts]).contiguous()
            return linear_for(weights, fused)

        self.lm_head: Linear = head_linear(weights, dense_weight(hf_model.lm_head, dtype))
        self.layers = [
            self.layer_weights(index, layer, linear, self.layer_prefix(index))
            for index, layer in enumerate(inner.layers)
        ]
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.attention_scale()
        length = max_positions or config.max_position_embeddings
        self.rope_tables = {
            kind: self._signed(cos, sin)
            for kind, (cos, sin) in self.rotary_tables(hf_model, inner, length).items()
        }
        self.rotary_dim = next(iter(self.rope_tables.values()))[0].shape[-1]
        self.windows = sorted({w.window for w in self.layers}, key=lambda w: w or 0)
        # whether a GEMM gives a row the same bits in any batch (checked on this device), with
        # prompt GEMMs in fixed row blocks where that takes them (`row_blocks`: AMX), and
        # where not natively, which parts of attention this device gives the same bits over
        # a longer extent (decode rows then attend over their own extent class, sharing those)
        # ... and (row blocks) prompt attention on fixed blocks of query rows (set by
        # settle_wide_gemms with the blocks: attention.prompt_attention)
        self.prompt_query_block: int | None = None
        # prompt chunks attend on ragtune's kernel (engine/attention_prompt.py: exact under
        # any chunking by construction), else on torch's GEMMs (models/attention.py)
        self.prompt_kernel = attention_prompt.resolve(prompt_attention, self)
        self.rows_independent, self.row_blocks, self.padded_extents = settle_wide_gemms(
            self, length, row_blocks, team_may_shrink
        )
        # Where the device sums by the row count (AMX bf16 kernels, MKL's fp32 GEMMs; with
        # prompt row blocks or without), decode's library GEMMs
        # (LoRA, and every GEMM under dense weights) run on this many rows whatever the batch:
        # with one row count a row's bits depend neither on its neighbours nor on its position
        # (measured). The runner sets it to the batch capacity.
        self.fixed_decode_rows: int | None = None
        # ... and (GPUs, where padding is cheap beside launches) prompt forwards run on this
        # many rows, so that several prompts may share one (the runner sets it)
        self.fixed_prefill_rows: int | None = None
        # ... or (CPUs without row blocks, whose GEMMs need none) rounded up to this
        # multiple, and prompt attention over key extents rounded up to
        # `prompt_key_multiple` (masked): a prompt's rows then come out the same with a token
        # appended after them (an echo of a choice, the next chunk's tokens), as far as
        # measured on AMX (ForwardPasses.prefill); with row blocks, in any chunking (checked
        # at start-up: exactness.prompt_attention_exact). The runner sets them.
        self.prefill_row_multiple: int | None = None
        self.prompt_key_multiple: int | None = None
        # decode attention on ragtune's kernel (engine/attention_rows.py: rows on their own,
        # no extent classes needed), set by the runner
        self.attention_kernel = False
        # ... and every decoder layer of a decode step in one call (engine/decode_layers.py,
        # a DecodeLayers), set by the runner where it runs
        self.decode_layers = None
        if self.row_blocks:
            logger.info(
                "this device's GEMMs depend on the row count: prompt GEMMs run in fixed row "
                "blocks and prompt attention %s (so prompts share forwards and the prefix "
                "cache is on), decode pads library GEMMs to a fixed row count; decode "
                "attention shares across extent classes: %s",
                "on ragtune's kernel"
                if self.prompt_kernel
                else "in fixed query blocks over keys padded to a multiple",
                describe_sharing(self.padded_extents),
            )
        elif not self.rows_independent:
            logger.info(
                "this device's GEMMs depend on the row count: prompts prefill one at a time, "
                "the prefix cache is off, decode pads library GEMMs to a fixed row count; "
                "decode attention shares across extent classes: %s",
                describe_sharing(self.padded_extents),
            )

    # ------------------------------------------------------------------ family hooks
    @staticmethod
    def text_config(config):
        """The decoder's config (multimodal wrappers nest it)."""
        return config

    @staticmethod
    def decoder(hf_model):
        """The module holding embed_tokens, layers and norm."""
        return hf_model.model

    @staticmethod
    def layer_prefix(index: int) -> str:
        """The checkpoint name of layer `index` (packed weights are read from the file)."""
        return f"model.layers.{index}"

    def embedding(self, inner) -> torch.Tensor:
        return inner.embed_tokens.weight.detach().to(self.dtype).contiguous()

    def norm_weight(self, norm: torch.nn.Module) -> torch.Tensor:
        """A Llama RMSNorm: rounded to the compute dtype, then times the weight."""
        return doubled(norm.weight, self.dtype)

    def attention_scale(self) -> float:
        return self.head_dim**-0.5

    def layer_weights(self, index: int, layer, linear: LinearFactory, prefix: str) -> LayerWeights:
        raise NotImplementedError

    def layer_window(self, index: int) -> int | None:
        """The sliding window of layer `index`, as Hugging Face applies it: `layer_types`
        where the config has them (Qwen2/3 `max_window_layers`, Gemma 3's interleaving),
        else `sliding_window` on every layer (Mistral, Phi-3)."""
        config = self.config
        window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None:
            return window if layer_types[index] == "sliding_attention" else None
        return window

    def rotary_tables(
        self, hf_model, inner, length: int
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """cos and sin [positions, rotary_dim] per rotary kind. The model's own rotary module
        computes them, so every rope scaling variant is handled."""
        positions = torch.arange(length, device=self.device)[None]
        probe = torch.zeros(1, device=self.device, dtype=torch.float32)
        cos, sin = inner.rotary_emb(probe, positions)
        return {GLOBAL_ROPE: (cos[0], sin[0])}

    # ------------------------------------------------------------------------------ helpers
    def _signed(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The tables in the compute dtype, sin with the rotate-half sign folded in, so
        _rotate needs one roll (see there)."""
        cos, sin = cos.to(self.dtype), sin.to(self.dtype)
        half = sin.shape[-1] // 2
        return cos, torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)


def module_shapes(model: DecoderModel) -> dict[str, tuple[int, int]]:
    """(in, out) features of every module a LoRA may target, by PEFT module name."""
    q, kv, hidden, inter = model.q_size, model.kv_size, model.hidden, model.intermediate
    shapes = {
        "q_proj": (hidden, q),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "qkv_proj": (hidden, q + 2 * kv),
        "o_proj": (q, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "gate_up_proj": (hidden, 2 * inter),
        "down_proj": (inter, hidden),
    }
    targetable = {name for names in model.LORA_GROUPS.values() for name in names}
    return {name: shape for name, shape in shapes.items() if name in targetable}


__all__ = [
    "DecoderModel",
    "LayerWeights",
    "PromptChunk",
    "RowScores",
    "module_shapes",
]
