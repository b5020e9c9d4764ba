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

Where ragtune's kernels build (engine/a8.py), one call of csrc/lora_rows.cpp adds every
row's delta for a group and layer, each row reading its own slot's factors (float32 sums, one
fixed order per row), so a step that mixes four adapters costs about what one does.

The factors are rounded to int8 per output channel (symmetric, the channel's largest
magnitude to 127) when an adapter loads: the delta's error is at most about 1/254 of each
factor row's largest weight, far below the int4 base weights' own rounding. Prompt prefill
keeps the float factors; `engine.weights: dense` keeps float LoRA everywhere (the path the
tests hold to PEFT's outputs).
"""

from __future__ import annotations

import ctypes
from typing import NamedTuple

import torch

from server.engine import native
from server.engine.linear import KERNEL_DTYPE, Int8Linear, per_channel_int8

INNER_MULTIPLE = Int8Linear.INNER_MULTIPLE  # the packed kernel's input-length multiple
KERNEL_MAX_WIDTH = 256  # csrc/lora_rows.cpp's limit on a pair's width


class RowwisePair(NamedTuple):
    """One fused group's factors for one adapter and layer, int8 codes with one KERNEL_DTYPE
    scale per output channel: t = x Aᵀ, delta = t Bᵀ. The float32 scales and Bᵀ are the
    same pair in csrc/lora_rows.cpp's layout."""

    a: torch.Tensor  # [width, in]
    a_scales: torch.Tensor  # [width]
    b: torch.Tensor  # [out, width], block-diagonal over the group's parts
    b_scales: torch.Tensor  # [out]
    a_scales32: torch.Tensor  # [width] float32
    bt: torch.Tensor  # B's codes in blocks of 16 outputs: [ceil(out / 16), width, 16]
    b_scales32: torch.Tensor  # [out] float32


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
    return RowwisePair(
        a_codes,
        a_scales.to(KERNEL_DTYPE),
        b_codes,
        b_scales.to(KERNEL_DTYPE),
        a_scales.float().contiguous(),
        blocks_of_outputs(b_codes),
        b_scales.float().contiguous(),
    )


def blocks_of_outputs(b_codes: torch.Tensor) -> torch.Tensor:
    """B's codes [out, width] as csrc/lora_rows.cpp reads them: [ceil(out / 16), width, 16],
    zeros past the last output (one sequential read per call, not `width` strided ones)."""
    out_features, width = b_codes.shape
    padded = b_codes.new_zeros(-(-out_features // 16) * 16, width)
    padded[:out_features] = b_codes
    return padded.view(-1, 16, width).permute(0, 2, 1).contiguous()


def kernel_supported(module_shapes: dict[str, tuple[int, int]], widths: list[int]) -> bool:
    """Whether csrc/lora_rows.cpp takes these shapes (lengths in vectors of 8, widths up to
    KERNEL_MAX_WIDTH) and builds on this machine."""
    shapes_fit = all(n % 8 == 0 for shape in module_shapes.values() for n in shape)
    widths_fit = all(width <= KERNEL_MAX_WIDTH for width in widths)
    return shapes_fit and widths_fit and native.unavailable_reason() is None


class SlotTable:
    """One layer's group, for csrc/lora_rows.cpp: each slot's pair as pointers, indexed by
    slot (null where the slot has none). The pairs stay referenced by LoraSlots.rowwise."""

    def __init__(self, num_slots: int):
        self.a = (ctypes.c_void_p * num_slots)()
        self.a_scales = (ctypes.c_void_p * num_slots)()
        self.bt = (ctypes.c_void_p * num_slots)()
        self.b_scales = (ctypes.c_void_p * num_slots)()
        self.widths = (ctypes.c_int32 * num_slots)()

    def set(self, slot: int, pair: RowwisePair | None) -> None:
        self.a[slot] = None if pair is None else pair.a.data_ptr()
        self.a_scales[slot] = None if pair is None else pair.a_scales32.data_ptr()
        self.bt[slot] = None if pair is None else pair.bt.data_ptr()
        self.b_scales[slot] = None if pair is None else pair.b_scales32.data_ptr()
        self.widths[slot] = 0 if pair is None else pair.a.shape[0]

    def holds_any(self, slots) -> bool:
        return any(self.a[slot] for slot in slots)


class KernelRows(NamedTuple):
    """One group's LoRA in a decode step on csrc/lora_rows.cpp: each row's slot (-1: none)."""

    row_slot: torch.Tensor  # [rows] int32
    table: SlotTable

    def pointers(self) -> tuple:
        """The kernel's LoRA arguments: row_slot, a, a_scales, bt, b_scales, widths."""
        t = self.table
        return self.row_slot.data_ptr(), t.a, t.a_scales, t.bt, t.b_scales, t.widths


def add_kernel_rows(rows: KernelRows, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (a fresh projection output) + each row's delta, in place, in one call."""
    if not out.is_contiguous():
        return out.copy_(add_kernel_rows(rows, x, out.contiguous()))
    x = x.to(out.dtype)
    if x.stride(1) != 1:  # rows may lie any distance apart (a norm's slice), features not
        x = x.contiguous()
    native.library().lora_rows(
        x.data_ptr(), int(x.dtype == torch.bfloat16), x.shape[0], x.stride(0), x.shape[1],
        out.shape[1], out.data_ptr(), *rows.pointers(), torch.get_num_threads(),
        native.chosen_isa(),
    )  # fmt: skip
    return out


# (rows of the batch that use the slot, None: every row; the slot's pair)
RowwiseTerms = list[tuple[torch.Tensor | None, RowwisePair]]


def add_rowwise(
    terms: RowwiseTerms | KernelRows, x: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """out (a fresh projection output) + each slot's delta on that slot's rows, in place: in
    one call of csrc/lora_rows.cpp where it runs, else per slot on torch's int8 kernel, called
    directly (at one row a call costs a few microseconds, and a step makes eight per layer)."""
    if isinstance(terms, KernelRows):
        return add_kernel_rows(terms, x, out)
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
