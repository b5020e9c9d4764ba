"""The linear layers of the compact forward: one class per weight format, each computing
y = x Wᵀ with every row on its own (what batch invariance rests on; see tests/engine).

Dense in the compute dtype; weight-only int8 and int4 on torch's packed CPU kernels; int8 x
int8 on oneDNN for the vocabulary projection. Model families share these; which format a
weight gets is `engine.weights` (see `linear_for`)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from server.engine import native
from server.engine.a8 import A8Linear
from server.engine.channel_int8 import ChannelInt8Linear
from server.engine.linear_gpu import Int4GpuLinear
from server.engine.prompt_gemm import WideWeight
from server.engine.quantize import int4_dequantized, int4_grid, per_channel_int8


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
        self.wide = WideWeight(weight)

    def __call__(self, x: torch.Tensor, wide: bool = False) -> torch.Tensor:
        return self.wide(x) if wide else F.linear(x, self.weight)


# The activation dtype of the packed CPU kernels: their bf16 paths are vectorized on every
# x86 CPU (AVX2 converts to fp32 in registers), their fp32 paths are not (int4, 16 rows: 47 ms
# against 1.5 ms). Under fp32 compute a packed call rounds its input rows to bf16 and returns
# fp32; the rest of the model (attention, norms, LoRA, prompt GEMMs) stays in fp32.
KERNEL_DTYPE = torch.bfloat16


def packed_call(kernel, x: torch.Tensor) -> torch.Tensor:
    """kernel(x) in KERNEL_DTYPE, returned in x's dtype; each row stays on its own."""
    if x.dtype == KERNEL_DTYPE:
        return kernel(x.contiguous())
    return kernel(x.to(KERNEL_DTYPE)).to(x.dtype)


class Int8Linear:
    """Weight-only int8 (one scale per output channel), bf16 activations: decode on a CPU is
    bound by reading the weights, so half the bytes of bf16 is about half the time at small
    batches. The per-channel rounding error is at most 1/254 of a row's largest weight, and
    each row of the result is computed on its own whatever the batch size (measured), so
    outputs stay batch-invariant."""

    # the kernel reads input features in vectors of 16; other lengths crash it (SIGSEGV)
    INNER_MULTIPLE = 16

    def __init__(self, weight: torch.Tensor):
        if not self.fits(weight):
            raise ValueError(
                f"a weight of {weight.shape[1]} input features cannot be packed as int8 (needs "
                f"a multiple of {self.INNER_MULTIPLE}); set engine.weights: dense"
            )
        self.weight, scales = per_channel_int8(weight)
        self.scales = scales.to(KERNEL_DTYPE)
        self.dtype = weight.dtype  # the compute dtype: prompt chunks dequantize to it
        self.wide = WideWeight(self.dequantized)

    @classmethod
    def fits(cls, weight: torch.Tensor) -> bool:
        return weight.shape[1] % cls.INNER_MULTIPLE == 0

    def dequantized(self) -> torch.Tensor:
        """The int8 grid in the compute dtype, made on the fly (no dense copy is kept)."""
        return self.weight.to(self.dtype) * self.scales[:, None].to(self.dtype)

    def __call__(self, x: torch.Tensor, wide: bool = False) -> torch.Tensor:
        """`wide`: many rows (a prompt chunk), where the GEMM is compute-bound and the packed
        kernel is slower than dequantizing on the fly for the dense one (512-token prefill:
        506 ms packed, 327 ms dequantized, 310 ms bf16). Decode rows never take this path,
        so a row's decode result does not depend on the batch size."""
        if wide:
            return self.wide(x)
        return packed_call(
            lambda rows: torch._weight_int8pack_mm(rows, self.weight, self.scales), x
        )


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
        codes, scales_zeros = int4_grid(weight, self.GROUP, KERNEL_DTYPE)
        self.scales_zeros = scales_zeros  # [groups, out, 2]
        self.packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
        self.wide = WideWeight(int4_dequantized(codes, scales_zeros).to(weight.dtype))

    @property
    def dense(self) -> torch.Tensor:
        return self.wide.dense()

    @classmethod
    def fits(cls, weight: torch.Tensor) -> bool:
        return weight.shape[1] % cls.GROUP == 0 and weight.shape[0] % 16 == 0

    def __call__(self, x: torch.Tensor, wide: bool = False) -> torch.Tensor:
        if wide:
            return self.wide(x)
        return packed_call(
            lambda rows: torch._weight_int4pack_mm_for_cpu(
                rows, self.packed, self.GROUP, self.scales_zeros
            ),
            x,
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

    def __init__(self, weight: torch.Tensor, keep_dense: bool = False):
        codes, self.scales = per_channel_int8(weight)
        self.packed = torch.ops.onednn.qlinear_prepack(codes, None)
        # W8A8Layer: the same grid dequantized, for prompt chunks' dense GEMM
        dense = (codes.float() * self.scales[:, None]).to(weight.dtype) if keep_dense else None
        self.wide = WideWeight(dense) if dense is not None else None
        self.zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
        self.split_signs = self.mode() == "split"

    @staticmethod
    def supported() -> bool:
        return W8A8Linear.mode() is not None

    @staticmethod
    @functools.cache
    def mode() -> str | None:
        """How oneDNN's int8 linear sums exactly on this CPU: "shifted" (the row's codes
        + 128 as uint8, one GEMM), "split" (where the x86 kernels lack VNNI they add pairs of
        u8 x s8 products in int16, which saturates past 7 bits of activation: the codes'
        positive and negative parts, 0..127 each, go through one GEMM as two rows each and
        are subtracted after: 8-bit precision, exact sums), or None where this torch build
        has no oneDNN int8 linear. Checked once against integer arithmetic, worst cases."""
        if not torch.backends.mkldnn.is_available() or not hasattr(
            torch.ops.onednn, "qlinear_prepack"
        ):
            return None
        weights = torch.full((16, 64), 127, dtype=torch.int8)
        weights[1::2] = -127
        try:
            packed = torch.ops.onednn.qlinear_prepack(weights, None)
        except RuntimeError:
            return None
        for mode, top, zero_point in (("shifted", 255, 128), ("split", 127, 0)):
            activations = torch.full((2, 64), top, dtype=torch.uint8)
            activations[1, ::2] = 1
            try:
                products = _int8_linear(
                    activations, packed, torch.ones(16), torch.zeros(16).long(), zero_point
                )
            except RuntimeError:
                return None
            exact = ((activations.long() - zero_point) @ weights.long().t()).float()
            if torch.equal(products, exact):
                return mode
        return None

    def __call__(self, x: torch.Tensor, wide: bool = False) -> torch.Tensor:
        row_scales = x.abs().amax(-1, keepdim=True).float().clamp_(min=1e-12).div_(127)
        codes = torch.div(x, row_scales).round_()  # -127..127
        if self.split_signs:
            rows = x.shape[0]
            parts = torch.cat((codes.clamp(min=0), codes.neg().clamp_(min=0))).to(torch.uint8)
            products = _int8_linear(parts, self.packed, self.scales, self.zero_points, 0)
            return (products[:rows] - products[rows:]).mul_(row_scales)
        # shifted into uint8 (zero point 128): oneDNN's fast path takes unsigned activations
        shifted = codes.add_(128).to(torch.uint8)
        products = _int8_linear(shifted, self.packed, self.scales, self.zero_points)
        return products.mul_(row_scales)


def _int8_linear(
    codes: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor,
    zero_point: int = 128,
) -> torch.Tensor:
    """float32 [rows, out] = (codes - zero_point) @ weightsᵀ x scales: uint8 activations,
    int8 weights prepacked by oneDNN, one float32 scale per output channel."""
    return torch.ops.onednn.qlinear_pointwise(
        codes,
        1.0,
        zero_point,
        packed,
        scales,
        zero_points,
        None,
        1.0,
        0,
        torch.float32,
        "none",
        [],
        "",
    )


class W8A8Layer(W8A8Linear):
    """W8A8Linear for a layer's projections (`engine.weights: w8a8` where ragtune's a8 kernel
    cannot run or the shape does not fit it; engine/a8.py is the default), in the compute
    dtype.
    torch's int4 kernel computes each row on its own pass over the weights (16 rows cost 16
    times one: Gemma 3's gate/up, 538 against 72 µs), while oneDNN's int8 GEMM reads them once
    per batch (146 µs): the faster layer from about 4 rows up, slower at one row (quantizing
    the input and oneDNN's fixed cost per call). Integer sums are exact, so a row's result
    still does not depend on the batch. Prompt chunks of many rows use the same int8 grid
    dequantized (the dense GEMM, as Int4Linear's)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__(weight, keep_dense=True)

    def __call__(self, x: torch.Tensor, wide: bool = False) -> torch.Tensor:
        if wide:
            return self.wide(x)
        return super().__call__(x).to(x.dtype)


Linear = DenseLinear | Int8Linear | Int4Linear | W8A8Linear | A8Linear | Int4GpuLinear
DECODE_WEIGHTS = ("dense", "int8", "int4", "w8a8", "w4a8")


def linear_for(weights: str, weight: torch.Tensor) -> Linear:
    """The decode form of one weight. int4 and w4a8 fall back to int8 for a shape they cannot
    pack on a CPU, int4 to dense on a GPU (which has no int8 kind here)."""
    if weight.is_cuda:
        if weights == "int4" and Int4GpuLinear.fits(weight):
            return Int4GpuLinear(weight)
        return DenseLinear(weight)
    if weights == "w8a8":  # ragtune's kernel (groups of 32), else oneDNN's (per channel)
        if A8Linear.fits(weight) and native.unavailable_reason() is None:
            return A8Linear(weight, 8)
        return W8A8Layer(weight)
    if weights == "w4a8" and A8Linear.fits(weight):
        return A8Linear(weight, 4)
    if weights == "int4" and Int4Linear.fits(weight):
        return Int4Linear(weight)
    if weights in ("int4", "int8", "w4a8"):
        return Int8Linear(weight)
    return DenseLinear(weight)


def head_linear(weights: str, weight: torch.Tensor) -> Linear:
    """The vocabulary projection's form. On a CPU it keeps 8 bits under int4, as 4-bit GGUF
    presets keep token_embd/output at 6-8 bits (the bundled Q4_1 file: Q8_0); int4 there cost
    +7 % perplexity. Its activations go to int8 too (W8A8Linear): perplexity 15.00 against
    14.95 with weight-only int8, 2.8 ms less per 16-row step. Under fp32 compute the
    weight-only kernels would also round the logits to bf16 (ties between the top tokens:
    seen on the emulated AVX2 kind), so int8 takes it too. Where the CPU has AVX-512 VNNI
    (no AMX) ragtune's own kernel computes W8A8Linear's arithmetic (engine/channel_int8.py:
    the same logits, 16 rows of Gemma 3's head in ~5.3 ms against ~7.6). On a GPU int4 takes
    the head too (see engine/linear_gpu.py)."""
    if weight.is_cuda:
        return linear_for(weights, weight)
    w8a8 = weights in ("int4", "w4a8", "w8a8") or (
        weights == "int8" and weight.dtype == torch.float32
    )
    if w8a8 and ChannelInt8Linear.supported() and ChannelInt8Linear.fits(weight):
        return ChannelInt8Linear(weight)  # the same bits as W8A8Linear, faster
    if w8a8 and W8A8Linear.supported():
        return W8A8Linear(weight)
    return linear_for("int8" if weights in ("int4", "w4a8") else weights, weight)


def packed_weights_supported(weights: str, dtype: torch.dtype, device: str) -> bool:
    """Where each packed kind runs: int8, int4, w8a8 and w4a8 serve bf16 and fp32 compute on CPUs
    (fp32 through KERNEL_DTYPE); on CUDA only int4, under bf16 compute."""
    if str(device).startswith("cpu"):
        return dtype in (torch.bfloat16, torch.float32)
    return weights == "int4" and str(device).startswith("cuda") and dtype == torch.bfloat16
