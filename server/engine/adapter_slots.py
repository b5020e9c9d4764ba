"""Which adapter occupies which of the runner's LoRA slots (server/engine/lora.py holds the
weights): slots running sequences use are pinned, the others reused least-recently-used
first."""

from __future__ import annotations

from collections import OrderedDict

from server.engine.lora import AdapterWeights, LoraSlots


class AdapterSlotTable:
    """Which adapter occupies which LoRA slot; slots in use by running sequences are pinned,
    the others are reused least-recently-used first."""

    def __init__(self, lora: LoraSlots):
        self.lora = lora
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # key -> slot, LRU order
        self._users: dict[int, int] = {}  # slot -> running sequences using it
        self._free = list(range(lora.num_slots))

    def can_acquire(self, adapter: AdapterWeights) -> bool:
        if adapter.key in self._slot_of or self._free:
            return True
        return any(self._users.get(slot, 0) == 0 for slot in self._slot_of.values())

    def acquire(self, adapter: AdapterWeights) -> int:
        slot = self._slot_of.get(adapter.key)
        if slot is None:
            if self._free:
                slot = self._free.pop(0)
            else:
                victim = next(k for k, s in self._slot_of.items() if self._users.get(s, 0) == 0)
                slot = self._slot_of.pop(victim)
            try:
                self.lora.load(slot, adapter)
            except Exception:
                self.lora.clear(slot)
                self._free.append(slot)
                raise
            self._slot_of[adapter.key] = slot
        self._slot_of.move_to_end(adapter.key)
        self._users[slot] = self._users.get(slot, 0) + 1
        return slot

    def release(self, slot: int) -> None:
        self._users[slot] -= 1

    def evict(self, key: str) -> None:
        """Drop an adapter's slot contents (after unload) once nothing running uses it."""
        slot = self._slot_of.get(key)
        if slot is not None and self._users.get(slot, 0) == 0:
            del self._slot_of[key]
            self.lora.clear(slot)
            self._free.append(slot)
