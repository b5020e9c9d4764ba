"""Adapter problems the HTTP layer turns into 4xx (OpenAI error shape)."""

from __future__ import annotations


class AdapterError(Exception):
    """The adapter exists but is invalid for this server (400)."""

    def __init__(self, message: str, param: str | None = "lora_path"):
        super().__init__(message)
        self.param = param


class AdapterNotFoundError(Exception):
    """No adapter (or version) by that name is loaded (404)."""


class AdapterConflictError(AdapterError):
    """Name@version already loaded and `replace` not set (400, like vLLM)."""


class AdapterUnavailableError(Exception):
    """A loaded version was evicted from memory and its directory can no longer be reloaded
    (moved, changed or now linking outside the roots). Deliberately not an AdapterError: the
    details (paths) go to the server log, the client gets a server error."""
