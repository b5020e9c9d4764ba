"""RMSNorm of every row in one call on a CPU: the C++ kernel in csrc/rms_norm.cpp (why, and
its arithmetic, there). Rows of a [rows, features] or [tokens, heads, features] view are read
in place at any strides (a norm's input is often a slice: q and k heads of a fused
projection); the output is contiguous."""

from __future__ import annotations

import torch

from server.engine import native


def supported(device: torch.device | str, dtype: torch.dtype) -> bool:
    return (
        str(device).startswith("cpu")
        and dtype in (torch.bfloat16, torch.float32)
        and native.unavailable_reason() is None
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x²) + eps) * weight over the last axis; weight float32 [features], a
    multiple of 8 features."""
    features = x.shape[-1]
    if x.dim() not in (2, 3) or x.stride(-1) != 1:
        x = x.reshape(-1, features).contiguous()
    outer, inner = x.shape[0], x.shape[1] if x.dim() == 3 else 1
    inner_stride = x.stride(1) if x.dim() == 3 else 0
    out = torch.empty(x.shape, dtype=x.dtype)
    native.library().rms_norm_rows(
        x.data_ptr(), int(x.dtype == torch.bfloat16), outer, x.stride(0), inner, inner_stride,
        features, weight.data_ptr(), eps, out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return out


__all__ = ["rms_norm", "supported"]
