"""The weight grids the linear kinds store (engine/linear.py on CPUs, engine/linear_gpu.py on
CUDA): one place decides how a weight is rounded, whichever kernel then multiplies it."""

from __future__ import annotations

import torch


def per_channel_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes [out, in] of a weight, one float32 scale per output channel (its
    largest magnitude maps to 127)."""
    scales = weight.float().abs().amax(dim=1).clamp(min=1e-12) / 127
    return torch.round(weight.float() / scales[:, None]).to(torch.int8).contiguous(), scales


def group_grid(
    weight: torch.Tensor, group: int, bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric `bits`-bit codes of a weight [out, in] in groups of `group` input channels:
    int32 codes 0..2^bits-1 [out, in], and float32 scales and offsets [out, in // group], w =
    code * scale + offset (each group's minimum). At 4 bits the codes are int4_grid's."""
    out_features, in_features = weight.shape
    levels = 2**bits - 1
    groups = weight.float().view(out_features, in_features // group, group)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = ((high - low) / levels).clamp(min=1e-8)
    codes = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, levels)
    return codes.to(torch.int32).view(out_features, in_features), scale, low


def group_dequantized(
    codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor
) -> torch.Tensor:
    """The float32 weight [out, in] that group_grid's codes, scales and offsets stand for."""
    grouped = codes.float().view(*scale.shape, -1)
    return (grouped * scale[..., None] + offset[..., None]).view(codes.shape)


def int4_grid(
    weight: torch.Tensor, group: int, dtype: torch.dtype = torch.bfloat16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit codes of a weight [out, in] in groups of `group` input channels (a
    scale and an offset per group, GGUF Q4_1's layout): int32 codes 0..15 [out, in] and the
    scales and zeros [in // group, out, 2] in `dtype`, in torch's int4 kernels' convention
    w = (code - 8) * scale + zero (CPU and CUDA alike): group_grid's 4-bit grid."""
    codes, scale, low = group_grid(weight, group, 4)
    scales_zeros = torch.stack([scale, low + 8 * scale], -1).to(dtype)
    return codes, scales_zeros.transpose(0, 1).contiguous()


def int4_dequantized(codes: torch.Tensor, scales_zeros: torch.Tensor) -> torch.Tensor:
    """The float32 weight [out, in] that int4_grid's codes and scales stand for."""
    out_features, in_features = codes.shape
    groups = scales_zeros.shape[0]
    scale, zero = scales_zeros.float().transpose(0, 1).unbind(-1)  # [out, groups] each
    grouped = codes.float().view(out_features, groups, in_features // groups)
    return ((grouped - 8) * scale[..., None] + zero[..., None]).view(out_features, in_features)
