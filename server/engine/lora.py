"""Many LoRA adapters in one forward pass.

Each resident adapter owns a slot in fixed-size buffers (`max_loras` slots of `max_lora_rank`,
smaller ranks zero-padded, alpha/r folded into B). For a fused projection group a step runs
a GEMM pair for each slot its rows use, t_s = x @ A_sᵀ and delta_s = t_s @ B_s, each of the
same shape whatever the batch, zeroes the rows of t_s that belong to other slots (or the base
model) and sums the deltas over slots: a row gets its own slot's delta plus exact zeros, so
its result is the same alone or next to any neighbours. Only the slots in use are computed: a
lone adapter row costs one rank-r product, not max_loras of them.
A slot may instead hold a sparse adapter (engine/sparse.py), whose rows get its sparse delta.
Decode steps over packed base weights take another route (engine/lora_rowwise.py). What a
forward does with a step's slots is engine/lora_apply.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine.lora_apply import LoraBatch
from server.engine.lora_rowwise import (
    RowwisePair,
    SlotTable,
    kernel_supported,
    pack_pair,
)
from server.engine.sparse import SparseAdapterWeights, group_matrices

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
