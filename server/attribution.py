"""Which adapter version served the current request.

Noted by the serving layer when it resolves the request's adapter (after any canary split),
read by the request middleware: the `X-Ragtune-Adapter-Version` response header and the
per-version counters (server/canary.py), and by anything else that records responses (the
feedback ledger). One mutable holder per request in a context variable, so a note made in a
copied context (a streaming task) still reaches the middleware.
"""

from __future__ import annotations

from contextvars import ContextVar, Token
from dataclasses import dataclass

HEADER = "X-Ragtune-Adapter-Version"


@dataclass
class Served:
    adapter: str | None = None
    version: str | None = None
    failed: bool = False  # a stream that ended with a server-error event after a 200

    @property
    def model_id(self) -> str | None:
        return f"{self.adapter}@{self.version}" if self.adapter else None


_served: ContextVar[Served | None] = ContextVar("served", default=None)


def begin() -> tuple[Served, Token]:
    """A fresh holder for one request (the middleware resets the token at its end)."""
    holder = Served()
    return holder, _served.set(holder)


def end(token: Token) -> None:
    _served.reset(token)


def current() -> Served | None:
    return _served.get()


def split_key(key: str) -> tuple[str, str]:
    """AdapterWeights.key `name@version#load` -> (name, version)."""
    name, _, rest = key.partition("@")
    return name, rest.partition("#")[0]


def note_adapter(key: str) -> None:
    """Record the adapter version that serves this request (no-op outside a request)."""
    holder = _served.get()
    if holder is not None:
        holder.adapter, holder.version = split_key(key)


def note_failed() -> None:
    """A streamed response ended with a server error after its headers went out."""
    holder = _served.get()
    if holder is not None:
        holder.failed = True
