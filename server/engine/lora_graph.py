"""LoRA inside captured decode steps (engine/cuda_graphs.py): every slot's factors applied to
every row, each row's product masked to its own slot, in two GEMMs batched over the slot
axis.

Why not engine/lora.py's route: it chooses on the host, each step, which slots run and which
rows each may touch; a captured graph replays one fixed sequence of kernels, so here the
choice lives in data (a mask built on the device from each row's slot). The shapes depend on
the slot count alone, never on which adapters the batch holds, so a row's bits are the same
alone and next to any neighbours: the other slots add exact zeros to its sum. Rank-r products
of all slots are cheap beside the base GEMMs (4 slots x rank 16 on a 2048-wide layer: 0.5 %
of its multiply-adds)."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:
    from server.engine.lora import LoraSlots


class EverySlotTerms(NamedTuple):
    """One fused group of one layer: every slot's factors and the rows' slot mask."""

    a: torch.Tensor  # [slots, in, width]
    b: torch.Tensor  # [slots, width, out]
    mask: torch.Tensor  # [slots, rows, 1]: 1 where the row uses that slot


def slot_mask(lora: LoraSlots, row_slots: torch.Tensor) -> torch.Tensor:
    """[slots, rows, 1] in the LoRA dtype from each row's slot (-1: none), on the device."""
    slots = torch.arange(lora.num_slots, device=row_slots.device)
    return (slots[:, None] == row_slots[None, :]).to(lora.dtype)[:, :, None]


def every_slot_terms(lora: LoraSlots, mask: torch.Tensor, index: int) -> dict[str, EverySlotTerms]:
    """Layer `index`'s terms for every group (LayerAdapters.every_slot)."""
    return {
        group: EverySlotTerms(lora.a[group][index], lora.b[group][index], mask)
        for group in lora.groups
    }


def add_every_slot(terms: EverySlotTerms, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out + each row's own slot's delta: x Aₛ for every slot s at once, masked, times Bₛ,
    summed over the slots (one non-zero term per row)."""
    t = torch.matmul(x.to(terms.a.dtype), terms.a) * terms.mask  # [slots, rows, width]
    return out + torch.matmul(t, terms.b).sum(0).to(out.dtype)
