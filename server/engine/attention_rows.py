"""Decode attention for every row of a step in one call per layer, which also writes the
step's new keys and values: the C++ kernel in csrc/attention_rows.cpp (why, and its
arithmetic: Hugging Face's eager attention, each row summed in an order set by its own keys).

A row's result depends on its own keys alone, not on the step's longest extent, so rows of
any length share one call on every CPU: the extent classes of attention.plan_decode (for
GEMMs whose summation order follows the extent) are not needed on this route."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from server.engine import native
from server.engine.kv_cache import KVCache

if TYPE_CHECKING:
    from server.engine.models.base import DecoderModel


@dataclass
class RowsPlan:
    """One decode step's attention in layers of one sliding window (or none)."""

    length: int  # keys every row's call reads (the longest row's, a ring's at most)
    bias: torch.Tensor  # [rows, length] float32: 0 where a row may look, -inf not
    writes: torch.Tensor  # [rows] int64: the index each row's new key and value go to


def unsupported_reason(model: DecoderModel, device: str, fixed_layout: bool) -> str | None:
    """Why this model's decode steps cannot take the kernel here, or None where they can:
    a cache whose layout moves (CUDA graphs keep theirs), and what every CPU attention
    kernel needs (cpu_kernel_reason)."""
    if fixed_layout and str(device).startswith("cpu"):
        return "CUDA graphs' fixed cache layout"
    return cpu_kernel_reason(model, device)


def cpu_kernel_reason(model: DecoderModel, device: str) -> str | None:
    """What ragtune's CPU attention kernels (decode's, and the prompt kernel's) need, or None:
    a CPU, bf16 or float32, head_dim a multiple of 16, no soft cap, the kernels built."""
    if not str(device).startswith("cpu"):
        return f"the kernel runs on a CPU, not {device}"
    if model.dtype not in (torch.bfloat16, torch.float32):
        return f"the kernel takes bf16 or float32, not {model.dtype}"
    if model.head_dim % 16:
        return f"head_dim {model.head_dim} is not a multiple of 16"
    if getattr(model, "attn_softcap", None) is not None:
        return "attention scores are soft-capped (torch's route applies the cap)"
    return native.unavailable_reason()


def plan(
    model: DecoderModel,
    positions: torch.Tensor,  # [rows] each row's position
    writes: torch.Tensor,  # [rows] where each row's new key and value go (its position)
    cache: KVCache,
    window: int | None,
) -> RowsPlan:
    """The keys to read and each row's mask in layers of this window: a ring layer's keys
    in index order, masked by how far back each lies (DecoderModel.mask)."""
    ring = cache.ring_for(window)
    length = cache.keys_in(int(positions.max()) + 1, ring is not None)
    bias = model.mask(positions, length, window, ring).float().contiguous()
    index = writes % ring if ring is not None else writes
    return RowsPlan(length, bias, index.to(torch.int64).contiguous())


MAX_ROTATED_HEAD = 256  # head_dim up to which the kernel applies the rotary embedding


def rotates(model: DecoderModel) -> bool:
    """Whether the kernel applies this model's rotary embedding to q and the new keys itself
    (one call instead of torch's four ops a layer: LayerArithmetic._rotate's arithmetic, the
    same bits)."""
    return model.head_dim <= MAX_ROTATED_HEAD


NO_ROPE = (None, None, 0, 0)


def attend(
    model: DecoderModel,
    layer: int,
    q: torch.Tensor,  # [rows, heads, d]
    k: torch.Tensor,  # [rows, kv_heads, d] the step's new keys (rotated unless `rope`)
    v: torch.Tensor,  # [rows, kv_heads, d]
    cache: KVCache,
    step: RowsPlan,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,  # cos, signed sin [rows, 1, r]
) -> torch.Tensor:
    """Write row i's key and value into slot i at its index, then its attention: [rows,
    q_size] in the cache's dtype. With `rope` (where `rotates(model)`), q and k come
    unrotated and the kernel turns them first, as LayerArithmetic._rotate would."""
    d = model.head_dim
    q, k, v = (rows_of_heads(x, d) for x in (q, k, v))
    keys_t, values = cache.keys_t[layer], cache.values[layer]
    rows = q.shape[0]
    out = torch.empty(rows, model.q_size, dtype=cache.dtype)
    rotary = NO_ROPE if rope is None else rope_arguments(model, rope, rows, cache.dtype)
    native.library().attention_rows(
        q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0),
        step.writes.data_ptr(), keys_t.data_ptr(), values.data_ptr(), keys_t.shape[-1],
        step.bias.data_ptr(), step.length, rows, model.num_heads, model.num_kv_heads, d,
        model.scale, out.data_ptr(), int(cache.dtype == torch.bfloat16),
        torch.get_num_threads(), int(native.attention_pairs()), *rotary,
    )  # fmt: skip
    return out


def rope_arguments(
    model: DecoderModel, rope: tuple[torch.Tensor, torch.Tensor], rows: int, dtype: torch.dtype
) -> tuple[int, int, int, int]:
    """The kernel's rotary arguments, checked: a wrong shape would make it read past them."""
    cos, sin = rope
    rotary_dim = cos.shape[-1]
    for table in (cos, sin):
        if (
            table.dtype != dtype
            or table.shape[0] < rows
            or table.shape[-1] != rotary_dim
            or table.stride(-1) != 1
            or table.stride(0) != cos.stride(0)
        ):
            raise ValueError("cos and sin must be [rows, 1, rotary_dim] in the cache's dtype")
    if not rotates(model) or rotary_dim > model.head_dim or rotary_dim % 2:
        raise ValueError(f"the kernel cannot rotate {rotary_dim} of {model.head_dim} features")
    return cos.data_ptr(), sin.data_ptr(), cos.stride(0), rotary_dim


def rows_of_heads(x: torch.Tensor, d: int) -> torch.Tensor:
    """x [rows, heads, d] with heads d apart and features adjacent (the kernel's layout; any
    row stride), copied only where it is not."""
    if x.stride(-1) == 1 and x.stride(-2) == d:
        return x
    return x.contiguous()


__all__ = [
    "RowsPlan",
    "attend",
    "cpu_kernel_reason",
    "plan",
    "rotates",
    "rows_of_heads",
    "unsupported_reason",
]
