"""What a forward does with one step's adapters: the per-step view of the LoRA slots
(`LoraBatch`, from `LoraSlots.batch` in engine/lora.py), each layer's factors as plain tensors
(`LayerAdapters`), and the delta of each row's adapter added to a projection's output (LoRA
here; sparse, rowwise and captured every-slot terms from their own modules)."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

from server.engine.a8 import A8Linear
from server.engine.lora_graph import EverySlotTerms, add_every_slot
from server.engine.lora_rowwise import KernelRows, RowwiseTerms, add_rowwise
from server.engine.sparse import SparseTerms, add_sparse

if TYPE_CHECKING:
    from server.engine.lora import LoraSlots


class GroupLora(NamedTuple):
    """What one fused group of one layer needs in a step (see add_lora)."""

    a: torch.Tensor  # [used slots, in, parts * rank]
    b: torch.Tensor  # [used slots, parts * rank, out]
    mask: torch.Tensor | None  # [used slots, rows, 1]: 1 where the row is that slot's
    rows: int  # the row count the GEMMs run on (inputs are padded with zero rows to it)


class LayerAdapters(NamedTuple):
    """What one layer's projections add in a step; a group no row uses is absent."""

    lora: dict[str, GroupLora]
    sparse: dict[str, SparseTerms]
    rowwise: dict[str, RowwiseTerms | KernelRows]
    # every slot on every row, masked (captured decode steps: engine/lora_graph.py)
    every_slot: dict[str, EverySlotTerms] | None = None


class LoraBatch:
    """The per-step view: which slots the rows use, which rows each may touch, and which
    groups are worth running."""

    def __init__(
        self,
        slots: LoraSlots,
        select: slice | torch.Tensor,
        mask: torch.Tensor | None,
        rows: int,
        active_groups: set[str],
        sparse: dict[int, torch.Tensor | None],  # sparse slot -> its rows (None: all)
        rowwise: dict[int, torch.Tensor | None] | None = None,  # rowwise slot -> its rows
        prompt: bool = False,  # prompt chunks: the slots' prompt_dtype factors
        row_slot: torch.Tensor | None = None,  # rowwise rows' slots for csrc/lora_rows.cpp
    ):
        self.slots = slots
        self.select = select
        self.mask = mask
        self.rows = rows
        self.active_groups = active_groups
        self.sparse = sparse
        self.rowwise = rowwise or {}
        self.prompt = prompt
        self.row_slot = row_slot

    @property
    def rowwise_only(self) -> bool:
        """Every adapter row takes the rowwise route: no GEMM here depends on the row count,
        so the rows need neither padding nor copies (models/base.py decode)."""
        return bool(self.rowwise) and not self.active_groups and not self.sparse

    def repeat_rows(self, times: int) -> LoraBatch:
        """The same view for `times` copies of a one-row batch."""
        mask = None if self.mask is None else self.mask.repeat(1, times, 1)
        # a lone row uses its sparse adapter (rows None) or has none: nothing to repeat
        row_slot = None if self.row_slot is None else self.row_slot.repeat(times)
        return LoraBatch(
            self.slots,
            self.select,
            mask,
            self.rows * times,
            self.active_groups,
            self.sparse,
            self.rowwise,
            row_slot=row_slot,
        )

    def pad_rows(self, rows: int) -> LoraBatch:
        """The same view for a batch padded to `rows` rows (the extra rows use no adapter).
        `add_lora` pads the input to this height with zero rows, so the LoRA GEMMs always see
        the same row count (see DecoderModel.fixed_decode_rows); a zero row's delta is 0."""
        extra = rows - self.rows
        if extra <= 0:
            return self
        mask = self.mask
        if mask is not None:
            mask = torch.cat((mask, mask.new_zeros(mask.shape[0], extra, 1)), dim=1)
        row_slot = self.row_slot
        if row_slot is not None:
            row_slot = torch.cat((row_slot, row_slot.new_full((extra,), -1)))
        return LoraBatch(
            self.slots,
            self.select,
            mask,
            rows,
            self.active_groups,
            self.sparse,
            self.rowwise,
            row_slot=row_slot,
        )

    def layer(self, index: int) -> LayerAdapters:
        """The factors one layer needs, as plain tensors."""
        slots = self.slots
        a, b = (slots.prompt_a, slots.prompt_b) if self.prompt else (slots.a, slots.b)
        lora = {
            group: GroupLora(
                a[group][index][self.select],
                b[group][index][self.select],
                self.mask,
                self.rows,
            )
            for group in self.active_groups
        }
        sparse: dict[str, SparseTerms] = {}
        for slot, rows in self.sparse.items():
            for (layer, group), matrix in self.slots.sparse[slot].items():
                if layer == index:
                    sparse.setdefault(group, []).append((rows, matrix))
        rowwise: dict[str, RowwiseTerms | KernelRows] = {}
        if self.row_slot is not None and slots.tables is not None:
            for group, table in slots.tables[index].items():
                if table.holds_any(self.rowwise):
                    rowwise[group] = KernelRows(self.row_slot, table)
        else:
            for slot, rows in self.rowwise.items():
                for group, pair in self.slots.rowwise[slot][index].items():
                    rowwise.setdefault(group, []).append((rows, pair))
        return LayerAdapters(lora, sparse, rowwise)


def one_kernel_call(
    adapters: LayerAdapters | None, group: str, linear, wide: bool = False
) -> tuple[bool, KernelRows | None]:
    """Whether linear(x) plus each row's adapter delta for one fused projection group is one
    call of ragtune's a8 kernel (the projection is its GEMM on narrow rows, and the group's
    adapters, if any, all run on the LoRA rows kernel), and the rows to hand it."""
    if wide or not isinstance(linear, A8Linear):
        return False, None
    if adapters is None:
        return True, None
    if group in adapters.lora or group in adapters.sparse or adapters.every_slot:
        return False, None
    rows = adapters.rowwise.get(group)
    if rows is None or isinstance(rows, KernelRows):
        return True, rows
    return False, None


def project(
    adapters: LayerAdapters | None, group: str, linear, x: torch.Tensor, wide: bool = False
) -> torch.Tensor:
    """linear(x) plus each row's adapter delta for one fused projection group: in the
    same kernel call where one_kernel_call says so (a decode step: one call a group instead
    of two), else through add_adapters."""
    alone, rows = one_kernel_call(adapters, group, linear, wide)
    if alone:
        return linear(x, lora=rows)
    return add_adapters(adapters, group, x, linear(x, wide))


def add_adapters(
    adapters: LayerAdapters | None, group: str, x: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """out + the delta of each row's adapter (LoRA or sparse) for one fused projection group."""
    if adapters is None:
        return out
    if group in adapters.sparse:
        out = add_sparse(adapters.sparse[group], x, out)
    if group in adapters.lora:
        out = add_lora(adapters.lora[group], x, out)
    if group in adapters.rowwise:
        out = add_rowwise(adapters.rowwise[group], x, out)
    if adapters.every_slot is not None and group in adapters.every_slot:
        out = add_every_slot(adapters.every_slot[group], x, out)
    return out


def add_lora(factors: GroupLora, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out + the LoRA delta of each row's slot. A view taller than `x` (LoraBatch.pad_rows)
    pads `x` with zero rows to its height first.

    One GEMM pair per slot in use, never one batched GEMM over the slots: a batched GEMM may
    split its work by the batch size (one slot: threads share a product; several: one thread
    per product), and a row's bits would then depend on which adapters its neighbours use."""
    rows = x.shape[0]
    if factors.rows > rows:
        x = torch.cat((x, x.new_zeros(factors.rows - rows, x.shape[1])))
    x = x.to(factors.a.dtype)
    delta = None
    for index in range(factors.a.shape[0]):
        t = x @ factors.a[index]
        if factors.mask is not None:
            t = t * factors.mask[index]
        # each row has one non-zero term in this sum (its own slot's): adding exact zeros
        # to it, or it to zeros, keeps its bits whichever way the GEMM accumulates
        delta = t @ factors.b[index] if delta is None else delta.addmm_(t, factors.b[index])
    return out + delta[:rows].to(out.dtype)
