"""Many LoRA adapters in one forward pass.

Each resident adapter owns a slot in fixed-size buffers (`max_loras` slots of `max_lora_rank`,
smaller ranks zero-padded, alpha/r folded into B). For a fused projection the batch computes
t = x @ A_allᵀ once, zeroes the columns that do not belong to each row's slot, and adds
t @ B. Shapes depend only on the configured sizes, never on which adapters share the batch,
so a row's result is the same alone or next to any neighbours; base-model rows get a zero mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
    def __init__(
        self,
        num_layers: int,
        module_shapes: dict[str, tuple[int, int]],  # module -> (in, out)
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: str,
        groups: dict[str, tuple[str, ...]] = LLAMA_GROUPS,
    ):
        self.groups = groups
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.dtype = dtype
        self.device = device
        self.module_shapes = module_shapes
        width = num_slots * max_rank
        self.a: dict[str, torch.Tensor] = {}  # group -> [layers, parts * width, in]
        # group -> [layers, parts * width, group out], block-diagonal: part p's rows feed only
        # part p's output columns, so one GEMM applies every part (zero blocks add exact 0)
        self.b: dict[str, torch.Tensor] = {}
        self.out_offsets: dict[str, list[tuple[int, int]]] = {}
        for group, modules in groups.items():
            in_features = module_shapes[modules[0]][0]
            self.a[group] = torch.zeros(
                num_layers, len(modules) * width, in_features, dtype=dtype, device=device
            )
            offsets, start = [], 0
            for module in modules:
                offsets.append((start, start + module_shapes[module][1]))
                start += module_shapes[module][1]
            self.out_offsets[group] = offsets
            self.b[group] = torch.zeros(
                num_layers, len(modules) * width, start, dtype=dtype, device=device
            )
        self.column_slot = torch.arange(num_slots, device=device).repeat_interleave(max_rank)
        self._group_users: dict[str, set[int]] = {group: set() for group in groups}

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.a.values()) + sum(b.nbytes for b in self.b.values())

    def load(self, slot: int, adapter: AdapterWeights) -> None:
        """Copy an adapter's factors into `slot` (zeroing whatever was there)."""
        if adapter.rank > self.max_rank:
            raise ValueError(f"rank {adapter.rank} exceeds engine.max_lora_rank {self.max_rank}")
        self.clear(slot)
        width = self.num_slots * self.max_rank
        rows = slice(slot * self.max_rank, slot * self.max_rank + adapter.rank)
        for (layer, module), (a, b) in adapter.factors.items():
            group = next(g for g, modules in self.groups.items() if module in modules)
            part = self.groups[group].index(module)
            base = part * width
            start, stop = self.out_offsets[group][part]
            self.a[group][layer, base + rows.start : base + rows.stop] = a.to(self.dtype)
            self.b[group][layer, base + rows.start : base + rows.stop, start:stop] = b.t().to(
                self.dtype
            )
            self._group_users[group].add(slot)

    def clear(self, slot: int) -> None:
        width = self.num_slots * self.max_rank
        rows = slice(slot * self.max_rank, (slot + 1) * self.max_rank)
        for group, modules in self.groups.items():
            for part in range(len(modules)):
                self.a[group][:, part * width + rows.start : part * width + rows.stop] = 0
                self.b[group][:, part * width + rows.start : part * width + rows.stop] = 0
            self._group_users[group].discard(slot)

    def batch(self, row_slots: torch.Tensor) -> LoraBatch:
        """row_slots: [rows] slot of each row, -1 for the base model."""
        mask = (self.column_slot[None, :] == row_slots[:, None]).to(self.dtype)
        used = set(row_slots.unique().tolist()) - {-1}
        active = {group for group, users in self._group_users.items() if users & used}
        return LoraBatch(self, mask, active)


class LoraBatch:
    """The per-step view: which columns each row may use, and which groups are worth running."""

    def __init__(self, slots: LoraSlots, mask: torch.Tensor, active_groups: set[str]):
        self.slots = slots
        self.mask = mask  # [rows, num_slots * max_rank]
        self.active_groups = active_groups
        # the mask tiled once per part of a fused group (qkv: 3, gate_up: 2, o/down: 1)
        parts = {len(modules) for modules in slots.groups.values()}
        self._tiled = {count: mask.repeat(1, count) for count in parts}

    def repeat_rows(self, times: int) -> LoraBatch:
        """The same view for `times` copies of a one-row batch."""
        return LoraBatch(self.slots, self.mask.repeat(times, 1), self.active_groups)

    def pad_rows(self, rows: int) -> LoraBatch:
        """The same view for a batch padded to `rows` rows (the extra rows use no adapter).
        With a mask taller than its input, `add_lora` pads the input to the mask's height, so
        the LoRA GEMMs always see the same row count (see DecoderModel.fixed_decode_rows)."""
        extra = rows - self.mask.shape[0]
        if extra <= 0:
            return self
        mask = torch.cat((self.mask, self.mask.new_zeros(extra, self.mask.shape[1])))
        return LoraBatch(self.slots, mask, self.active_groups)

    def layer(self, index: int) -> LayerLora:
        """The factors one layer needs, as plain tensors: what the (compiled) layer function
        takes, so one compiled graph serves every layer."""
        return {
            group: (
                self.slots.a[group][index],
                self.slots.b[group][index],
                self._tiled[len(self.slots.groups[group])],
            )
            for group in self.active_groups
        }


# group -> (A [parts * width, in], B [parts * width, out], row mask [rows, parts * width]);
# a group that no row of the batch uses is absent
LayerLora = dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def add_lora(
    lora: LayerLora | None, group: str, x: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """out + the LoRA delta of each row's adapter for one fused projection group. A mask with
    more rows than `x` (LoraBatch.pad_rows) pads `x` with zero rows to its height first."""
    if lora is None or group not in lora:
        return out
    a, b, mask = lora[group]
    rows = x.shape[0]
    if mask.shape[0] > rows:
        x = torch.cat((x, x.new_zeros(mask.shape[0] - rows, x.shape[1])))
        return out + (((x @ a.t()) * mask) @ b)[:rows]
    return out + ((x @ a.t()) * mask) @ b
