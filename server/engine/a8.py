"""4- or 8-bit weights x int8 activations for decode rows (`engine.weights: w4a8`, `w8a8`): the
C++ kernel in csrc/a8_linear.cpp (built and loaded by engine/native.py).

Why a kernel of our own: torch's int4 CPU kernel makes one pass over the weights per row
(16 rows cost 16 times one), oneDNN's int8 GEMM reads them once per batch but has a fixed
cost per call that loses at one row. This one reads the weights once per call for every row,
with exact integer dot products (AVX-512 VNNI, else AVX2), so a row's result depends on that
row alone. llama.cpp multiplies its quantized formats the same way (activations in int8
blocks of 32)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from server.engine import native
from server.engine.prompt_gemm import WideWeight
from server.engine.quantize import group_dequantized, group_grid

if TYPE_CHECKING:
    from server.engine.lora_rowwise import KernelRows

GROUP = 32  # input channels per weight scale and per activation scale
LANES = 16  # output channels per packed block


def pack(
    codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """group_grid's codes [out, in] and per-group scale/offset [out, groups] in the kernel's
    layout (csrc/a8_linear.cpp): codes [out/16, groups, 8 quads, 16 lanes, 4] as bytes (bits
    8) or nibbles two quads to a byte (bits 4), and float16 params [out/16, groups, 2, 16]."""
    out_features, in_features = codes.shape
    blocks, groups = out_features // LANES, in_features // GROUP
    # channel = 16 * block + lane; input = 32 * group + 4 * quad + byte
    quads = codes.to(torch.uint8).view(blocks, LANES, groups, 8, 4).permute(0, 2, 3, 1, 4)
    if bits == 4:  # quads 2v and 2v+1 share vector v: low and high nibble
        pairs = quads.reshape(blocks, groups, 4, 2, LANES, 4)
        packed = pairs[:, :, :, 0] | (pairs[:, :, :, 1] << 4)
    else:
        packed = quads
    params = torch.stack([scale.half(), offset.half()])  # [2, out, groups]
    params = params.view(2, blocks, LANES, groups).permute(1, 3, 0, 2)
    return packed.contiguous(), params.contiguous()


NO_LORA = (None,) * 6  # the kernel's LoRA arguments when a call adds none
NO_FUSION = (None, 0.0, None, 0.0, None)  # ... and its norm and residual arguments

Norm = tuple[torch.Tensor, float]  # an RMSNorm's float32 weight and eps


def _norm_arguments(norm: Norm | None, features: int) -> tuple[int | None, float]:
    if norm is None:
        return None, 0.0
    weight, eps = norm
    if weight.dtype != torch.float32 or not weight.is_contiguous() or weight.numel() != features:
        raise ValueError(f"a fused norm takes a contiguous float32 weight of {features}")
    return weight.data_ptr(), eps


def _fused_arguments(
    norm: Norm | None,
    out_norm: Norm | None,
    residual: torch.Tensor | None,
    out: torch.Tensor,
    in_features: int,
) -> tuple[int | None, float, int | None, float, int | None]:
    """The kernel's norm (before and after) and residual arguments, checked: a wrong shape
    or dtype would make the kernel read past a buffer."""
    if residual is not None and (
        residual.shape != out.shape or residual.dtype != out.dtype or not residual.is_contiguous()
    ):
        raise ValueError(f"the residual must be contiguous {out.dtype} {tuple(out.shape)}")
    return (
        *_norm_arguments(norm, in_features),
        *_norm_arguments(out_norm, out.shape[1]),
        residual.data_ptr() if residual is not None else None,
    )


class A8Linear:
    """Weights on a grid of `bits` (4 or 8) bits in groups of 32 input channels (a scale and
    an offset each: GGUF Q4_1's layout at 4 bits), packed for the kernel; activations
    quantized to int8 per block of 32 inside it. Prompt chunks of many rows use the same grid
    dequantized (the dense GEMM, as Int4Linear's)."""

    GROUP = GROUP

    def __init__(self, weight: torch.Tensor, bits: int, isa: int | None = None):
        self.lib = native.library()
        self.bits = bits
        self.isa = isa or native.chosen_isa()  # 1: AVX2, 2: AVX-512 VNNI (tests force either)
        codes, scale, offset = group_grid(weight, GROUP, bits)
        # float16 scales and offsets, as the kernel reads them (and GGUF's Q4_1 stores them:
        # nothing lost there); the dense copy for wide prompt chunks uses the same ones
        scale, offset = scale.half().float(), offset.half().float()
        self.out_features, self.in_features = weight.shape
        self.codes, self.params = pack(codes, scale, offset, bits)
        self.codes_ptr, self.params_ptr = self.codes.data_ptr(), self.params.data_ptr()
        self.wide = WideWeight(group_dequantized(codes, scale, offset).to(weight.dtype))

    @property
    def dense(self) -> torch.Tensor:
        return self.wide.dense()

    @classmethod
    def fits(cls, weight: torch.Tensor) -> bool:
        return weight.shape[1] % GROUP == 0 and weight.shape[0] % LANES == 0

    def __call__(
        self,
        x: torch.Tensor,
        wide: bool = False,
        lora: KernelRows | None = None,
        norm: Norm | None = None,
        residual: torch.Tensor | None = None,
        out_norm: Norm | None = None,
    ) -> torch.Tensor:
        """x @ Wᵀ; with `lora`, plus each row's LoRA delta in the same call (as
        lora_rowwise.add_kernel_rows would add it: the same bits, one call fewer). With
        `norm` (a float32 weight and eps), of RMSNorm(x) (as engine/rms_norm.py computes
        it); with `out_norm`, RMSNorm of the result; with `residual` ([rows, out], x's
        dtype), residual + the result: the same bits as those steps apart, in one call
        (DecoderModel._project). Not for wide rows."""
        if wide:
            if norm is not None or residual is not None or out_norm is not None:
                raise ValueError("the dense prompt path takes no fused norm or residual")
            return self.wide(x)
        # a decode step makes ~120 of these calls at one row, each a few µs of kernel: the
        # Python around it is kept to what varies per call (the weights' pointers are fixed)
        bf16 = native.bf16_flag(x, "a8 kernel")
        flat = x.dim() == 2
        rows = x if flat else x.reshape(-1, self.in_features)
        if rows.stride(1) != 1:  # the kernel takes rows any distance apart (a norm's slice)
            rows = rows.contiguous()
        count = rows.shape[0]
        out = torch.empty((count, self.out_features), dtype=x.dtype)
        fused = NO_FUSION
        if norm is not None or residual is not None or out_norm is not None:
            fused = _fused_arguments(norm, out_norm, residual, out, self.in_features)
        self.lib.a8_linear(
            rows.data_ptr(), bf16, count, rows.stride(0), self.in_features, self.codes_ptr,
            self.params_ptr, self.out_features, out.data_ptr(), bf16, torch.get_num_threads(),
            self.isa, self.bits, *(lora.pointers() if lora is not None else NO_LORA), *fused,
        )  # fmt: skip
        return out if flat else out.view(*x.shape[:-1], self.out_features)


def lies_on_4bit_grid(weight: torch.Tensor) -> bool:
    """Whether the 4-bit grid (groups of 32, a scale and a minimum each) reproduces `weight`
    up to its own rounding: true of a checkpoint converted from a Q4_0/Q4_1 GGUF (every group
    already spans 16 levels), false of 5- to 16-bit weights, whose re-rounding to 4 bits costs
    quality (Gemma 3 270M's Q5_0/Q6_K/Q8_0 layers: perplexity +34 %, docs/performance.md)."""
    codes, scale, offset = group_grid(weight, GROUP, 4)
    error = weight.float() - group_dequantized(codes, scale, offset)
    return bool(error.abs().mean() <= 0.05 * scale.mean())
