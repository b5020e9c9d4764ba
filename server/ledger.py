"""The response ledger: which model, adapter version and key produced each recent response.

Feedback names a response by its id; the rating is only useful with the adapter *version*
that actually served it (an adapter's active version may change between the answer and the
rating, and a canary serves two versions under one name). The ledger keeps that for the last
`feedback.max_responses` chat completions, in memory, and nothing of their prompts or
answers: an entry is a handful of short identifiers.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass
class ServedResponse:
    """What served one response; `rating` is set once feedback arrived."""

    id: str
    model: str  # the `model` field as the client sent it (base, `name` or `name@version`)
    adapter: str | None  # adapter name actually served; None for the base model
    version: str | None  # adapter version actually served; None for the base model
    key_id: str | None  # the caller's key id (None when keys are off)
    choices: int = 1
    created: float = field(default_factory=time.time)
    rating: str | None = None

    @classmethod
    def of(
        cls,
        response_id: str,
        model: str,
        adapter_key: str | None,
        key_id: str | None,
        choices: int = 1,
    ) -> ServedResponse:
        """From the served weights' key, "name@version#load-id" (None: the base model)."""
        adapter, version = None, None
        if adapter_key:
            adapter, _, rest = adapter_key.partition("@")
            version = rest.partition("#")[0] or None
        return cls(response_id, model, adapter, version, key_id, choices)


class ResponseLedger:
    """Bounded, oldest first out; safe to call from any thread."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, ServedResponse] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def remember(self, entry: ServedResponse) -> None:
        with self._lock:
            self._entries[entry.id] = entry
            self._entries.move_to_end(entry.id)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def get(self, response_id: str) -> ServedResponse | None:
        with self._lock:
            return self._entries.get(response_id)

    def rate(self, response_id: str, rating: str) -> str | None:
        """Set the entry's rating; return the rating it already had (None if first)."""
        with self._lock:
            entry = self._entries[response_id]
            previous = entry.rating
            if previous is None:
                entry.rating = rating
            return previous
