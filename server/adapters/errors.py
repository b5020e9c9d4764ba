"""Adapter problems the HTTP layer turns into 4xx (OpenAI error shape)."""

from __future__ import annotations

from server.engine.types import EngineError


class AdapterError(Exception):
    """The adapter exists but is invalid for this server (400)."""

    def __init__(self, message: str, param: str | None = "lora_path"):
        super().__init__(message)
        self.param = param


class AdapterNotFoundError(Exception):
    """No adapter (or version) by that name is loaded (404)."""


class AdapterConflictError(AdapterError):
    """Name@version already loaded and `replace` not set (400, like vLLM)."""


class AdapterUnavailableError(EngineError):
    """A loaded version was evicted from memory and its directory can no longer be reloaded
    (moved, changed or now linking outside the roots). Deliberately not an AdapterError (a
    client 400 naming server paths): the details go to the server log, the client gets a
    server error. An EngineError so the HTTP layer's registered handler answers it (an
    unregistered exception type would drop the connection)."""
