"""Decode-time LoRA on the packed int8 kernel, each slot over its own rows only.

Where the base model decodes on packed CPU weights (`engine.weights` int4/int8), a decode
step's LoRA products run through the kernel the int8 base layers use (torch's weight-only
int8 GEMM, as `Int8Linear` calls it), whose loop computes each output row from that row
alone, with the same summation order at any row count (checked in tests/engine). So no row
needs padding to a fixed row count, and no slot's GEMMs run over other slots' rows: a slot
computes its own rows (gathered when the batch mixes adapters) and adds its delta to them.
The float path (engine/lora.py) pads every LoRA GEMM to `fixed_decode_rows` rows on CPUs
whose float GEMMs depend on the row count (AMX, MKL), 16x the work for a lone row, and runs
every used slot over every row.

The factors are rounded to int8 per output channel (symmetric, the channel's largest
magnitude to 127) when an adapter loads: the delta's error is at most about 1/254 of each
factor row's largest weight, far below the int4 base weights' own rounding. Prompt prefill
keeps the float factors; `engine.weights: dense` keeps float LoRA everywhere (the path the
tests hold to PEFT's outputs).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from server.engine.linear import KERNEL_DTYPE, Int8Linear, per_channel_int8

INNER_MULTIPLE = Int8Linear.INNER_MULTIPLE  # the packed kernel's input-length multiple


class RowwisePair(NamedTuple):
    """One fused group's factors for one adapter and layer, int8 codes with one KERNEL_DTYPE
    scale per output channel: t = x Aᵀ, delta = t Bᵀ."""

    a: torch.Tensor  # [width, in]
    a_scales: torch.Tensor  # [width]
    b: torch.Tensor  # [out, width], block-diagonal over the group's parts
    b_scales: torch.Tensor  # [out]


def rowwise_supported(module_shapes: dict[str, tuple[int, int]]) -> bool:
    """Every projection's input length is one the kernel reads."""
    return all(fan_in % INNER_MULTIPLE == 0 for fan_in, _ in module_shapes.values())


def pack_pair(a: torch.Tensor, b: torch.Tensor, used_columns: list[int]) -> RowwisePair:
    """From a slot's float factors, A [in, width] and B [width, out] (LoraSlots' layout), the
    int8 pair over the columns the adapter fills, zero-padded to the kernel's multiple."""
    width = -(-len(used_columns) // INNER_MULTIPLE) * INNER_MULTIPLE
    a_rows = a.new_zeros(width, a.shape[0])
    b_cols = b.new_zeros(b.shape[1], width)
    index = torch.tensor(used_columns, dtype=torch.long, device=a.device)
    a_rows[: len(used_columns)] = a.index_select(1, index).t()
    b_cols[:, : len(used_columns)] = b.index_select(0, index).t()
    (a_codes, a_scales), (b_codes, b_scales) = per_channel_int8(a_rows), per_channel_int8(b_cols)
    return RowwisePair(a_codes, a_scales.to(KERNEL_DTYPE), b_codes, b_scales.to(KERNEL_DTYPE))


# (rows of the batch that use the slot, None: every row; the slot's pair)
RowwiseTerms = list[tuple[torch.Tensor | None, RowwisePair]]


def add_rowwise(terms: RowwiseTerms, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (a fresh projection output) + each slot's delta on that slot's rows, in place. The
    kernel is called directly: at one row a call costs a few microseconds, and a step makes
    eight per layer."""
    x = x.to(KERNEL_DTYPE).contiguous()  # the kernel's vectorized activation dtype
    for rows, pair in terms:
        rows_x = x if rows is None else x.index_select(0, rows)
        t = torch._weight_int8pack_mm(rows_x, pair.a, pair.a_scales)
        delta = torch._weight_int8pack_mm(t, pair.b, pair.b_scales).to(out.dtype)
        if rows is None:
            out.add_(delta)
        else:
            out.index_add_(0, rows, delta)
    return out
