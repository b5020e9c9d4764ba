"""Many LoRA adapters in one forward pass.

Each resident adapter owns a slot in fixed-size buffers (`max_loras` slots of `max_lora_rank`,
smaller ranks zero-padded, alpha/r folded into B). For a fused projection group a step runs
a GEMM pair for each slot its rows use, t_s = x @ A_sᵀ and delta_s = t_s @ B_s, each of the
same shape whatever the batch, zeroes the rows of t_s that belong to other slots (or the base
model) and sums the deltas over slots: a row gets its own slot's delta plus exact zeros, so
its result is the same alone or next to any neighbours. Only the slots in use are computed: a
lone adapter row costs one rank-r product, not max_loras of them.
A slot may instead hold a sparse adapter (engine/sparse.py), whose rows get its sparse delta.
Decode steps over packed base weights take another route (engine/lora_rowwise.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from server.engine.a8 import A8Linear
from server.engine.lora_graph import EverySlotTerms, add_every_slot
from server.engine.lora_rowwise import (
    KernelRows,
    RowwisePair,
    RowwiseTerms,
    SlotTable,
    add_rowwise,
    kernel_supported,
    pack_pair,
)
from server.engine.sparse import SparseAdapterWeights, SparseTerms, add_sparse, group_matrices

# Fused projection groups of the forward and the PEFT module names inside each, in the order
# of their output columns: Llama's layout. A family whose checkpoint fuses them (Phi-3:
# qkv_proj, gate_up_proj) names one module per group (see server/engine/models/).
LLAMA_GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}


@dataclass
class AdapterWeights:
    """One adapter's LoRA factors on the compute device, ready to copy into a slot."""

    key: str  # "name@version"
    rank: int
    # (layer, module) -> (A [rank, in], B_scaled [out, rank])
    factors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.factors.values())

    @property
    def target_modules(self) -> set[str]:
        return {module for _, module in self.factors}


class LoraSlots:
    """The resident adapters' factors, per group: A [layers, slots, in, parts * rank] (the
    parts' Aᵀ side by side) and B [layers, slots, parts * rank, group out], block-diagonal:
    part p's rows feed only part p's output columns, so one GEMM applies every part (zero
    blocks add exact 0)."""

    def __init__(
        self,
        num_layers: int,
        module_shapes: dict[str, tuple[int, int]],  # module -> (in, out)
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: str,
        groups: dict[str, tuple[str, ...]] = LLAMA_GROUPS,
        rowwise_decode: bool = False,
        prompt_dtype: torch.dtype | None = None,  # prompt chunks' GEMMs; default `dtype`
    ):
        self.groups = groups
        self.num_layers = num_layers
        # decode steps use each slot's int8 pairs over its own rows (engine/lora_rowwise.py)
        self.rowwise_decode = rowwise_decode
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.dtype = dtype
        self.device = device
        self.module_shapes = module_shapes
        self.a: dict[str, torch.Tensor] = {}
        self.b: dict[str, torch.Tensor] = {}
        self.out_offsets: dict[str, list[tuple[int, int]]] = {}
        for group, modules in groups.items():
            in_features = module_shapes[modules[0]][0]
            width = len(modules) * max_rank
            self.a[group] = torch.zeros(
                num_layers, num_slots, in_features, width, dtype=dtype, device=device
            )
            offsets, start = [], 0
            for module in modules:
                offsets.append((start, start + module_shapes[module][1]))
                start += module_shapes[module][1]
            self.out_offsets[group] = offsets
            self.b[group] = torch.zeros(
                num_layers, num_slots, width, start, dtype=dtype, device=device
            )
        # Prompt chunks may run their LoRA GEMMs in another dtype than decode: on AMX decode's
        # are float32 (kernel_choice.lora_dtype), where a 530-token prompt's 120 products of fp32
        # GEMMs, casts and adds cost 177 ms over its 299 ms base prefill; bf16 copies of the
        # factors let a prompt's rows use the compute dtype's GEMMs, with no casts.
        self.prompt_dtype = prompt_dtype or dtype
        self.prompt_a, self.prompt_b = self.a, self.b
        if self.prompt_dtype != dtype:
            self.prompt_a = {g: t.to(self.prompt_dtype) for g, t in self.a.items()}
            self.prompt_b = {g: t.to(self.prompt_dtype) for g, t in self.b.items()}
        self._group_users: dict[str, set[int]] = {group: set() for group in groups}
        # slot -> (layer, group) -> CSR delta, for slots holding a sparse adapter
        self.sparse: dict[int, dict[tuple[int, str], torch.Tensor]] = {}
        # slot -> per layer: group -> int8 pair, for LoRA slots when rowwise_decode
        self.rowwise: dict[int, list[dict[str, RowwisePair]]] = {}
        # ... and as per layer, group: pointers by slot, where csrc/lora_rows.cpp runs
        self.tables: list[dict[str, SlotTable]] | None = None
        # bumped whenever a slot's factors change: what depends on them may be cached by it
        self.generation = 0
        widths = [len(modules) * max_rank for modules in groups.values()]
        if rowwise_decode and kernel_supported(module_shapes, widths):
            self.tables = [{g: SlotTable(num_slots) for g in groups} for _ in range(num_layers)]

    @property
    def nbytes(self) -> int:
        buffers = [self.a, self.b]
        if self.prompt_a is not self.a:
            buffers += [self.prompt_a, self.prompt_b]
        return sum(t.nbytes for buffer in buffers for t in buffer.values())

    def load(self, slot: int, adapter: AdapterWeights | SparseAdapterWeights) -> None:
        """Copy an adapter's factors into `slot` (zeroing whatever was there)."""
        self.generation += 1
        if isinstance(adapter, SparseAdapterWeights):
            self.clear(slot)
            self.sparse[slot] = group_matrices(
                adapter, self.groups, self.module_shapes, self.out_offsets, self.device
            )
            return
        if adapter.rank > self.max_rank:
            raise ValueError(f"rank {adapter.rank} exceeds engine.max_lora_rank {self.max_rank}")
        self.clear(slot)
        for (layer, module), (a, b) in adapter.factors.items():
            group = next(g for g, modules in self.groups.items() if module in modules)
            part = self.groups[group].index(module)
            cols = slice(part * self.max_rank, part * self.max_rank + adapter.rank)
            start, stop = self.out_offsets[group][part]
            self.a[group][layer, slot, :, cols] = a.t().to(self.dtype)
            self.b[group][layer, slot, cols, start:stop] = b.t().to(self.dtype)
            self._group_users[group].add(slot)
        if self.prompt_a is not self.a:
            for group in self.groups:
                self.prompt_a[group][:, slot] = self.a[group][:, slot]
                self.prompt_b[group][:, slot] = self.b[group][:, slot]
        if self.rowwise_decode:
            self.rowwise[slot] = self._rowwise_pairs(slot, adapter)
            if self.tables is not None:
                for layer, tables in enumerate(self.tables):
                    for group, table in tables.items():
                        table.set(slot, self.rowwise[slot][layer].get(group))

    def _rowwise_pairs(self, slot: int, adapter: AdapterWeights) -> list[dict[str, RowwisePair]]:
        """The slot's factors as int8 pairs, per layer and group, over the columns it fills."""
        layers: list[dict[str, RowwisePair]] = [{} for _ in range(self.num_layers)]
        for layer in {layer for layer, _ in adapter.factors}:
            for group, modules in self.groups.items():
                parts = [p for p, m in enumerate(modules) if (layer, m) in adapter.factors]
                if not parts:
                    continue
                columns = [p * self.max_rank + j for p in parts for j in range(adapter.rank)]
                layers[layer][group] = pack_pair(
                    self.a[group][layer, slot].float(), self.b[group][layer, slot].float(), columns
                )
        return layers

    def clear(self, slot: int) -> None:
        self.generation += 1
        self.sparse.pop(slot, None)
        if self.tables is not None and slot in self.rowwise:
            for tables in self.tables:
                for table in tables.values():
                    table.set(slot, None)
        self.rowwise.pop(slot, None)
        for group in self.groups:
            self.a[group][:, slot] = 0
            self.b[group][:, slot] = 0
            self.prompt_a[group][:, slot] = 0
            self.prompt_b[group][:, slot] = 0
            self._group_users[group].discard(slot)

    def batch(self, row_slots: torch.Tensor, decode: bool = False) -> LoraBatch:
        """row_slots: [rows] slot of each row, -1 for the base model. `decode`: a decode
        step, whose LoRA slots take the rowwise route where it is on; else prompt chunks,
        in `prompt_dtype`."""
        slots = row_slots.tolist()
        in_use = set(slots) - {-1}
        only = len(in_use) == 1 and -1 not in slots  # every row on one slot
        sparse = {
            slot: None if only else _rows_of(slots, slot)
            for slot in sorted(in_use & set(self.sparse))
        }
        rowwise = {}
        if decode and self.rowwise_decode:
            rowwise = {
                slot: None if only else _rows_of(slots, slot)
                for slot in sorted(in_use & set(self.rowwise))
            }
        used = sorted(in_use - set(sparse) - set(rowwise))
        active = {group for group, users in self._group_users.items() if users & set(used)}
        select: slice | torch.Tensor = slice(0, 0)
        mask = None  # every row on the one LoRA slot: no row to zero
        if used and used == list(range(used[0], used[-1] + 1)):  # usually: a view, no copy
            select = slice(used[0], used[-1] + 1)
        elif used:
            select = torch.tensor(used, device=self.device)
        if len(used) > 1 or (used and len(in_use) + (-1 in slots) > 1):
            which = torch.tensor(used, device=self.device)
            dtype = self.dtype if decode else self.prompt_dtype
            mask = (which[:, None] == row_slots[None, :]).to(dtype)[:, :, None]
        row_slot = None
        if rowwise and self.tables is not None:  # csrc/lora_rows.cpp: each row's slot
            row_slot = torch.tensor([s if s in rowwise else -1 for s in slots], dtype=torch.int32)
        return LoraBatch(
            self, select, mask, len(slots), active, sparse, rowwise, not decode, row_slot
        )


def _rows_of(slots: list[int], slot: int) -> torch.Tensor:
    return torch.tensor([row for row, s in enumerate(slots) if s == slot])


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
