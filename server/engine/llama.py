"""A compact Llama forward for serving: batched decode and chunked prefill over a slot KV cache.

Why not the Hugging Face module: its cache is per batch, not per sequence, so sequences cannot
join and leave a running batch, and its per-step Python overhead dominates on small models.
The weights come from the loaded Hugging Face model (quantized ones dequantized once to the
compute dtype), q/k/v and gate/up are fused into one GEMM each, and every attention call uses
the same masked path whether a row runs alone or in a batch, which keeps greedy outputs
independent of batch neighbours.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ragtune.models.checkpoint import open_checkpoint
from server.engine.kv_cache import KVCache
from server.engine.lora import LayerLora, LoraBatch, LoraSlots, add_lora

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
# Prompt chunks above this many tokens run packed weights dequantized (dense GEMM): one chunk
# alone breaks even at ~24 tokens (int4 23.2 ms, dense 22.6), prompts sharing a forward gain more.
WIDE_ROWS = 24


def supports(config) -> str | None:
    """None when this forward can run the model, else the reason it cannot."""
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        return f"model_type {config.model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "attention/MLP biases"
    if getattr(config, "sliding_window", None):
        return "sliding-window attention"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    return None


QKV_NAMES = ("q_proj", "k_proj", "v_proj")
GATE_UP_NAMES = ("gate_proj", "up_proj")


def is_bnb(linear: torch.nn.Module) -> bool:
    return type(linear.weight).__name__ in ("Params4bit", "Int8Params")


def dense_weight(linear: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """[out, in] weight of a plain or bitsandbytes-quantized linear layer, in `dtype`."""
    weight = linear.weight
    if is_bnb(linear):
        from peft.utils.integrations import dequantize_bnb_weight

        state = getattr(weight, "quant_state", None) or getattr(linear, "state", None)
        return dequantize_bnb_weight(weight, state=state).to(dtype).contiguous()
    return weight.detach().to(dtype).contiguous()


class DenseLinear:
    """y = x Wᵀ with W [out, in] in the compute dtype."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight

    def __call__(self, x: torch.Tensor, wide: bool = False) -> torch.Tensor:
        return F.linear(x, self.weight)


def per_channel_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes [out, in] of a weight, one float32 scale per output channel (its
    largest magnitude maps to 127)."""
    scales = weight.float().abs().amax(dim=1).clamp(min=1e-12) / 127
    return torch.round(weight.float() / scales[:, None]).to(torch.int8).contiguous(), scales


class Int8Linear:
    """Weight-only int8 (one scale per output channel), bf16 activations: decode on a CPU is
    bound by reading the weights, so half the bytes of bf16 is about half the time at small
    batches. The per-channel rounding error is at most 1/254 of a row's largest weight, and
    each row of the result is computed on its own whatever the batch size (measured), so
    outputs stay batch-invariant."""

    def __init__(self, weight: torch.Tensor):
        self.weight, scales = per_channel_int8(weight)
        self.scales = scales.to(weight.dtype)

    def __call__(self, x: torch.Tensor, wide: bool = False) -> torch.Tensor:
        """`wide`: many rows (a prompt chunk), where the GEMM is compute-bound and the packed
        kernel is slower than dequantizing on the fly for the dense one (512-token prefill:
        506 ms packed, 327 ms dequantized, 310 ms bf16). Decode rows never take this path,
        so a row's decode result does not depend on the batch size."""
        if wide:
            return F.linear(x, self.weight.to(x.dtype) * self.scales[:, None])
        return torch._weight_int8pack_mm(x.contiguous(), self.weight, self.scales)


class Int4Linear:
    """Weight-only int4 in groups of 32 input channels (a scale and an offset per group, the
    layout of GGUF's Q4_1), bf16 activations: a quarter of bf16's bytes, the fastest decode
    at every batch size measured here. The bundled model was published as Q4_1, and packed
    from its checkpoint this grid reproduces it (perplexity 43.5 against 44.4 for the bf16
    checkpoint). Prompt chunks of many rows use the same grid dequantized to bf16 (kept
    beside the packed weights), where the dense GEMM is 2.8x faster than the packed kernel
    (512 rows). Rows are computed independently of the batch size (checked in tests/engine)."""

    GROUP = 32

    def __init__(self, weight: torch.Tensor):
        out_features, in_features = weight.shape
        groups = weight.float().view(out_features, in_features // self.GROUP, self.GROUP)
        low, high = groups.amin(-1), groups.amax(-1)
        scale = ((high - low) / 15).clamp(min=1e-8)
        codes = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15)
        # the kernel's convention: w = (code - 8) * scale + zero, scale and zero in bf16
        scales_zeros = torch.stack([scale, low + 8 * scale], -1).to(weight.dtype)
        self.scales_zeros = scales_zeros.transpose(0, 1).contiguous()  # [groups, out, 2]
        self.packed = torch._convert_weight_to_int4pack_for_cpu(
            codes.to(torch.int32).view(out_features, in_features), 1
        )
        scale_q, zero_q = scales_zeros.float().unbind(-1)
        dequantized = (codes - 8) * scale_q[..., None] + zero_q[..., None]
        self.dense = dequantized.view(out_features, in_features).to(weight.dtype)

    @classmethod
    def fits(cls, weight: torch.Tensor) -> bool:
        return weight.shape[1] % cls.GROUP == 0 and weight.shape[0] % 16 == 0

    def __call__(self, x: torch.Tensor, wide: bool = False) -> torch.Tensor:
        if wide:
            return F.linear(x, self.dense)
        return torch._weight_int4pack_mm_for_cpu(
            x.contiguous(), self.packed, self.GROUP, self.scales_zeros
        )


class W8A8Linear:
    """int8 weights (one scale per output channel) times int8 activations (one scale per row,
    computed on the fly), through oneDNN's int8 GEMM on weights prepacked at load: the CPU's
    integer dot products do twice the multiply-adds of its bf16 ones and the integer sums are
    exact, so a row's result depends on that row alone. The scales apply afterwards, per row
    and channel, in float32. llama.cpp quantizes activations to 8 bits the same way for its
    quantized dot products. Used for the vocabulary projection under int4, where it runs
    once per step on one hidden state per row: 3.5 -> 1.3 ms at 16 rows, 1.4 -> 1.0 ms at one
    (cold weights, bench numbers in docs/performance.md). Not for the layers: quantizing
    four inputs per layer costs more than it saves at one row. Returns float32."""

    def __init__(self, weight: torch.Tensor):
        codes, self.scales = per_channel_int8(weight)
        self.packed = torch.ops.onednn.qlinear_prepack(codes, None)
        self.zero_points = torch.zeros(weight.shape[0], dtype=torch.long)

    @staticmethod
    @functools.cache
    def supported() -> bool:
        """oneDNN's int8 linear is in this torch build (x86) and sums exactly on this CPU.
        Without VNNI, x86 int8 kernels add pairs of u8 x s8 products in int16, which
        saturates: a worst-case product is checked against integer arithmetic once."""
        if not torch.backends.mkldnn.is_available() or not hasattr(
            torch.ops.onednn, "qlinear_prepack"
        ):
            return False
        weights = torch.full((16, 64), 127, dtype=torch.int8)
        weights[1::2] = -127
        activations = torch.full((2, 64), 255, dtype=torch.uint8)
        activations[1, ::2] = 1
        try:
            packed = torch.ops.onednn.qlinear_prepack(weights, None)
            products = _int8_linear(activations, packed, torch.ones(16), torch.zeros(16).long())
        except RuntimeError:
            return False
        return torch.equal(products, ((activations.long() - 128) @ weights.long().t()).float())

    def __call__(self, x: torch.Tensor, wide: bool = False) -> torch.Tensor:
        # Symmetric codes of each row shifted into uint8 (zero point 128): oneDNN's fast path
        # takes unsigned activations and signed weights.
        row_scales = x.abs().amax(-1, keepdim=True).float().clamp_(min=1e-12).div_(127)
        codes = torch.div(x, row_scales).round_().add_(128).to(torch.uint8)
        products = _int8_linear(codes, self.packed, self.scales, self.zero_points)
        return products.mul_(row_scales)


def _int8_linear(
    codes: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor
) -> torch.Tensor:
    """float32 [rows, out] = (codes - 128) @ weightsᵀ x scales: uint8 activations with zero
    point 128, int8 weights prepacked by oneDNN, one float32 scale per output channel."""
    return torch.ops.onednn.qlinear_pointwise(
        codes, 1.0, 128, packed, scales, zero_points, None, 1.0, 0, torch.float32, "none", [], ""
    )


Linear = DenseLinear | Int8Linear | Int4Linear | W8A8Linear
DECODE_WEIGHTS = ("dense", "int8", "int4")


def linear_for(weights: str, weight: torch.Tensor) -> Linear:
    """The decode form of one weight; int4 falls back to int8 for a shape it cannot pack."""
    if weights == "int4" and Int4Linear.fits(weight):
        return Int4Linear(weight)
    if weights in ("int4", "int8"):
        return Int8Linear(weight)
    return DenseLinear(weight)


def packed_weights_supported(dtype: torch.dtype, device: str) -> bool:
    """The packed int8/int4 kernels serve bf16 compute on CPUs; GPUs keep dense weights."""
    return dtype == torch.bfloat16 and str(device).startswith("cpu")


def gemm_rows_independent(model: LlamaModel) -> bool:
    """Whether every GEMM of the forward gives a row the same bits whatever other rows share
    the call, so that prompts can be prefilled together without changing any of them. True
    of oneDNN's bf16 GEMM and of the packed kernels on the CPUs measured here, but a kernel
    may pick its summation order by the row count (split-K GEMMs on GPUs, oneDNN's one-row
    path on some CPUs), so it is checked on this device, with the model's own weights."""
    generator = torch.Generator().manual_seed(0)

    def same_rows(linear, in_features: int, wide: bool, rows: int, slices) -> bool:
        x = torch.randn(rows, in_features, generator=generator).to(model.dtype)
        x = x.to(model.device)
        full = linear(x, wide)
        return all(torch.equal(linear(x[lo:hi], wide), full[lo:hi]) for lo, hi in slices)

    layer = model.layers[0]
    shapes = (
        (layer.qkv, model.hidden),
        (layer.o, model.num_heads * model.head_dim),
        (layer.gate_up, model.hidden),
        (layer.down, model.intermediate),
    )
    narrow = ((0, 1), (0, 2), (5, 5 + WIDE_ROWS), (64, 96))
    # a wide prompt's last chunk may be one row (the rest restored from the prefix cache)
    wide = ((0, 1), (0, 2), (3, 10), (0, WIDE_ROWS + 1), (100, 300), (470, 512))

    def dense(out_features: int, in_features: int) -> DenseLinear:  # LoRA A and B shapes
        weight = torch.randn(out_features, in_features, generator=generator)
        return DenseLinear(weight.to(model.dtype).to(model.device))

    return (
        all(same_rows(linear, n, False, 96, narrow) for linear, n in shapes)
        and all(same_rows(linear, n, True, 512, wide) for linear, n in shapes)
        and same_rows(model.lm_head, model.hidden, False, 16, ((0, 1), (3, 9)))
        and same_rows(dense(64, model.hidden), model.hidden, False, 96, narrow)
        and same_rows(dense(model.hidden, 64), 64, False, 96, narrow)
    )


def doubled(norm_weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An RMSNorm weight as `LlamaModel._rms_norm` takes it: [weight, weight]."""
    weight = norm_weight.detach().to(dtype)
    return torch.cat((weight, weight)).contiguous()


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [2 * hidden], see doubled
    qkv: Linear  # [(heads + 2 * kv_heads) * head_dim, hidden]
    o: Linear  # [hidden, heads * head_dim]
    post_norm: torch.Tensor  # [2 * hidden]
    gate_up: Linear  # [2 * intermediate, hidden]
    down: Linear  # [hidden, intermediate]


@dataclass
class PromptChunk:
    """Positions start..start+len(tokens) of one sequence's prompt."""

    tokens: list[int]
    start: int
    slot: int  # KV cache slot
    lora_slot: int  # -1: the base model
    # The prompt's kernel class: more than WIDE_ROWS tokens in the whole prompt (not this
    # chunk), so every chunk of a prompt, cached or computed, runs the same GEMMs. A chunk
    # is never one row unless the prompt is (the one-row GEMM path is not row-independent
    # on every input; see LlamaModel.decode).
    wide: bool


class LlamaModel:
    """Weights plus the two forward passes the scheduler needs."""

    def __init__(
        self,
        hf_model,
        dtype: torch.dtype,
        device: str,
        weights: str = "dense",  # one of DECODE_WEIGHTS
        source_dir: Path | None = None,  # the model's checkpoint directory
    ):
        config = hf_model.config
        self.config = config
        self.dtype = dtype
        self.device = device
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.hidden = config.hidden_size
        self.intermediate = config.intermediate_size
        self.eps = config.rms_norm_eps
        self.vocab_size = config.vocab_size
        self.num_layers = config.num_hidden_layers

        inner = hf_model.model
        self.embed = inner.embed_tokens.weight.detach().to(dtype).contiguous()
        self.norm = doubled(inner.norm.weight, dtype)
        self.weights = weights

        # Packed kinds quantize from the checkpoint when the loaded model is bitsandbytes-
        # quantized (see ragtune/models/checkpoint.py); dense serves the loaded model as is.
        source = open_checkpoint(source_dir) if weights != "dense" else None

        def weight(name: str, module: torch.nn.Module) -> torch.Tensor:
            key = f"{name}.weight"
            if weights != "dense" and is_bnb(module):
                if source is not None and key in source:
                    return source.tensor(key).to(dtype).contiguous()
                logger.warning("%s not in the checkpoint: packing its bitsandbytes weights", key)
            return dense_weight(module, dtype)

        def linear(*parts: tuple[str, torch.nn.Module]) -> Linear:
            fused = torch.cat([weight(name, module) for name, module in parts]).contiguous()
            return linear_for(weights, fused)

        # The vocabulary projection keeps 8 bits under int4, as 4-bit GGUF presets keep
        # token_embd/output at 6-8 bits (the bundled Q4_1 file: Q8_0); int4 there cost +7 %
        # perplexity. Its activations go to int8 too (W8A8Linear): perplexity 15.00 against
        # 14.95 with weight-only int8, 2.8 ms less per 16-row step.
        head = dense_weight(hf_model.lm_head, dtype)
        if weights == "int4" and W8A8Linear.supported():
            self.lm_head: Linear = W8A8Linear(head)
        else:
            self.lm_head = linear_for("int8" if weights == "int4" else weights, head)
        self.layers = []
        for index, layer in enumerate(inner.layers):
            attn, mlp, prefix = layer.self_attn, layer.mlp, f"model.layers.{index}"
            self.layers.append(
                LayerWeights(
                    input_norm=doubled(layer.input_layernorm.weight, dtype),
                    qkv=linear(*((f"{prefix}.self_attn.{n}", getattr(attn, n)) for n in QKV_NAMES)),
                    o=linear((f"{prefix}.self_attn.o_proj", attn.o_proj)),
                    post_norm=doubled(layer.post_attention_layernorm.weight, dtype),
                    gate_up=linear(
                        *((f"{prefix}.mlp.{n}", getattr(mlp, n)) for n in GATE_UP_NAMES)
                    ),
                    down=linear((f"{prefix}.mlp.down_proj", mlp.down_proj)),
                )
            )
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self._cos, self._sin = self._rope_tables(hf_model, config.max_position_embeddings)
        # whether a GEMM gives a row the same bits in any batch (checked on this device)
        self.rows_independent = gemm_rows_independent(self)
        if not self.rows_independent:
            logger.info(
                "this device's GEMMs depend on the batch: prompts prefill one at a time and "
                "the prefix cache is off"
            )

    def _rope_tables(self, hf_model, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Reuse the model's own rotary module so every rope_scaling variant is handled.
        rotary = hf_model.model.rotary_emb
        positions = torch.arange(length, device=self.device)[None]
        probe = torch.zeros(1, device=self.device, dtype=torch.float32)
        cos, sin = rotary(probe, positions)
        cos, sin = cos[0].to(self.dtype), sin[0].to(self.dtype)  # [positions, head_dim]
        half = sin.shape[-1] // 2
        # sin with the rotate-half sign folded in, so _rotate needs one roll (see there)
        return cos, torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)

    # ------------------------------------------------------------------------------ helpers
    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm as LayerNorm over [x, -x]: that row has mean 0 and variance mean(x²), so
        LayerNorm's fused CPU kernel computes x / sqrt(mean(x²) + eps) * weight in one pass,
        where torch's rms_norm on a CPU is six ops (5.6 against 12.4 µs at one row). Float32
        inside, one rounding at the end (LlamaRMSNorm rounds before the weight: outputs
        differ from it by at most one unit in the last place). `weight`: doubled,
        [weight, weight] (see `doubled`)."""
        features = x.shape[-1]
        paired = torch.cat((x, x.neg()), dim=-1)
        return F.layer_norm(paired, (2 * features,), weight, None, self.eps)[..., :features]

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        """HF's x * cos + rotate_half(x) * sin, where rotate_half(x) = cat(-x2, x1): the same
        products bit for bit (the sign moved onto sin), in one roll instead of three ops."""
        return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin

    def _attention_input(
        self,
        w: LayerWeights,
        x: torch.Tensor,  # [tokens, hidden]
        cos: torch.Tensor,  # [tokens, 1, head_dim]
        sin: torch.Tensor,
        lora: LayerLora | None,
        wide: bool = False,  # a prompt chunk of more than WIDE_ROWS tokens
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Norm, fused q/k/v projection and rotary embedding: q [tokens, heads, d], k and v
        [tokens, kv_heads, d]."""
        h = self._rms_norm(x, w.input_norm)
        qkv = add_lora(lora, "qkv", h, w.qkv(h, wide))
        tokens = x.shape[0]
        # q and k heads side by side, rotated in one go
        qk = qkv[:, : self.q_size + self.kv_size].view(tokens, -1, self.head_dim)
        q, k = self._rotate(qk, cos, sin).split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, self.q_size + self.kv_size :].view(tokens, self.num_kv_heads, self.head_dim)
        return q, k, v

    def _attention_output(
        self,
        w: LayerWeights,
        x: torch.Tensor,  # [tokens, hidden] the layer's input (residual)
        attn: torch.Tensor,  # [tokens, q_size]
        lora: LayerLora | None,
        wide: bool = False,
    ) -> torch.Tensor:
        """Output projection, residual and MLP: the layer's output [tokens, hidden]."""
        x = x + add_lora(lora, "o", attn, w.o(attn, wide))
        h = self._rms_norm(x, w.post_norm)
        gate, up = add_lora(lora, "gate_up", h, w.gate_up(h, wide)).chunk(2, dim=-1)
        act = F.silu(gate) * up
        return x + add_lora(lora, "down", act, w.down(act, wide))

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self._rms_norm(x, self.norm)).float()

    # ------------------------------------------------------------------------------ passes
    @torch.inference_mode()
    def prefill(
        self, chunks: list[PromptChunk], cache: KVCache, lora_slots: LoraSlots | None
    ) -> torch.Tensor:
        """Run one chunk of each of several prompts in one forward: their rows share every
        GEMM (one read of the weights for all of them), attention runs per prompt. The chunks
        must be of one kernel class (see `prefill_groups`).

        Every row's result depends on its own prompt only, not on how the prompt is cut into
        chunks nor on the other prompts of the forward (where `rows_independent`): the GEMMs
        give a row the same bits in any batch, and the attention below is exact under any
        query subset and masked key extent.

        Returns [len(chunks), vocab] float32 logits of each chunk's last token.
        """
        wide = chunks[0].wide
        if any(c.wide != wide for c in chunks):
            raise ValueError("prompt chunks of both kernel classes in one forward")
        device = self.device
        ids = torch.tensor([t for c in chunks for t in c.tokens], device=device)
        positions = torch.cat([torch.arange(c.start, c.start + len(c.tokens)) for c in chunks])
        positions = positions.to(device)
        x = self.embed[ids]
        cos, sin = self._cos[positions][:, None, :], self._sin[positions][:, None, :]
        bounds, biases, offset = [], [], 0
        group = self.num_heads // self.num_kv_heads
        for c in chunks:
            count = len(c.tokens)
            bounds.append((offset, offset + count))
            rows = positions[offset : offset + count]
            end = c.start + count
            # [1, group * count, end]: token i sees cache positions <= start + i
            hidden = torch.arange(end, device=device)[None, :] > rows[:, None]
            bias = torch.zeros(hidden.shape, dtype=self.dtype, device=device)
            biases.append(bias.masked_fill(hidden, float("-inf")).repeat(group, 1)[None])
            offset += count
        lora = None
        if lora_slots is not None and any(c.lora_slot >= 0 for c in chunks):
            row_slots = [c.lora_slot for c in chunks for _ in c.tokens]
            lora = lora_slots.batch(torch.tensor(row_slots, device=device))
        for index, w in enumerate(self.layers):
            layer_lora = lora.layer(index) if lora is not None else None
            q, k, v = self._attention_input(w, x, cos, sin, layer_lora, wide)
            parts = []
            for c, (lo, hi), bias in zip(chunks, bounds, biases, strict=True):
                cache.write_prompt(index, c.slot, c.start, k[lo:hi], v[lo:hi])
                keys_t, values = cache.prompt_view(index, c.slot, c.start + hi - lo)
                # the query heads that share a kv head, all rows: [kv_heads, group * rows, d]
                grouped = q[lo:hi].transpose(0, 1).reshape(self.num_kv_heads, -1, self.head_dim)
                attn = self._attention(grouped, keys_t, values, bias)
                attn = attn.view(self.num_kv_heads, group, hi - lo, self.head_dim)
                parts.append(attn.permute(2, 0, 1, 3).reshape(hi - lo, self.q_size))
            attn = parts[0] if len(parts) == 1 else torch.cat(parts)
            x = self._attention_output(w, x, attn, layer_lora, wide)
        last = torch.tensor([hi - 1 for _, hi in bounds], device=device)
        return self._logits(x[last])

    def prefill_groups(self, chunks: list[PromptChunk]) -> list[list[int]]:
        """Which chunks may share a forward: those of one kernel class, and only where every
        GEMM gives a row the same bits in any batch (`rows_independent`); else one each."""
        if not self.rows_independent:
            return [[i] for i in range(len(chunks))]
        narrow = [i for i, c in enumerate(chunks) if not c.wide]
        wide = [i for i, c in enumerate(chunks) if c.wide]
        return [group for group in (narrow, wide) if group]

    @torch.inference_mode()
    def decode(
        self,
        tokens: torch.Tensor,  # [batch] last token of each running sequence (rows = slots)
        positions: torch.Tensor,  # [batch] position of that token
        write_positions: torch.Tensor,  # [batch] where its K/V go (= positions for real rows)
        cache: KVCache,
        lora: LoraBatch | None,
    ) -> torch.Tensor:
        """One decode step for the sequences in slots 0..batch-1; returns [batch, vocab].

        A lone row that goes through oneDNN GEMMs (dense weights, or LoRA) is computed as two
        identical rows: on some CPUs oneDNN's one-row (GEMV) kernel sums in another order than
        its kernels for two or more rows, which would make a request's tokens depend on
        whether it had batch neighbours. (Here the load-time GEMM check passes even at one row
        on random data, yet a lone LoRA row computed alone got other K/V bits at step 12 on the
        real model: the one-row path is data-dependent, so it is never used for a row that has
        neighbours elsewhere; see also PromptChunk.) The packed int4/int8 kernels give a row
        the same bits at one row as at two (checked in tests/engine), so a lone base-model
        row with them runs alone.
        """
        real = tokens.shape[0]
        if real == 1 and (self.weights == "dense" or lora is not None):
            tokens, positions = tokens.repeat(2), positions.repeat(2)
            lora = lora.repeat_rows(2) if lora is not None else None
        batch = tokens.shape[0]
        x = self.embed[tokens]
        cos, sin = self._cos[positions][:, None, :], self._sin[positions][:, None, :]
        length = cache.bucket(int(positions.max()) + 1)
        rows = torch.arange(real, device=self.device)
        hidden = torch.arange(length, device=self.device)[None, :] > positions[:real, None]
        # [real * kv_heads, heads per kv head, length]: 0 where a row may look, -inf where not
        bias = torch.zeros(hidden.shape, dtype=self.dtype, device=self.device)
        bias = bias.masked_fill(hidden, float("-inf"))[:, None, :]
        group = self.num_heads // self.num_kv_heads
        bias = bias.repeat_interleave(self.num_kv_heads, 0).expand(-1, group, -1).contiguous()

        for index, w in enumerate(self.layers):
            layer_lora = lora.layer(index) if lora is not None else None
            q, k, v = self._attention_input(w, x, cos, sin, layer_lora)
            cache.write_decode(index, rows, write_positions, k[:real], v[:real])
            keys_t, values = cache.batch_view(index, real, length)
            groups = real * self.num_kv_heads  # one query token per row: [groups, group, d]
            attn = self._attention(
                q[:real].reshape(groups, group, self.head_dim),
                keys_t.reshape(groups, self.head_dim, length),
                values.reshape(groups, length, self.head_dim),
                bias,
            ).reshape(real, self.q_size)
            if batch > real:  # the copy of a lone row: attention is per row, GEMMs are not
                attn = attn.expand(batch, -1)
            x = self._attention_output(w, x, attn, layer_lora)
        return self._logits(x)[:real]

    def _attention(
        self,
        grouped: torch.Tensor,  # [batch, group * queries, d] query heads sharing a kv head
        keys_t: torch.Tensor,  # [batch, d, length]
        values: torch.Tensor,  # [batch, length, d]
        bias: torch.Tensor,  # broadcast to [batch, group * queries, length]: 0 or -inf
    ) -> torch.Tensor:
        """Hugging Face's eager attention arithmetic (scores in the compute dtype, softmax in
        float32) in three ops: the scale and the mask fused into the score GEMM on transposed
        keys, one GEMM for the values. Exact under any subset of query rows and any masked
        key extent (masked keys weigh exactly zero; checked in tests/engine), which keeps a
        row's result independent of its batch neighbours, padded lengths and prompt chunking.
        For one query per row the CPU flash kernel is mostly overhead (1.47 ms against
        0.19 ms at 16 rows x 256 keys); for prompts SDPA fell back to its unfused math path."""
        scores = torch.baddbmm(bias, grouped, keys_t, alpha=self.scale)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(grouped.dtype)
        return torch.bmm(probs, values)
