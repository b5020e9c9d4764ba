"""Exceptions the server maps to HTTP statuses; one type per distinct client-visible outcome."""

from __future__ import annotations


class RetrievalError(Exception):
    """Base class for everything raised on purpose by the retrieval package."""


class InvalidIndexNameError(RetrievalError, ValueError):
    """The name does not match ``^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`` (server: 400)."""


class InvalidSourcesError(RetrievalError, ValueError):
    """The sources give nothing to index (none named, no text in them) or do not fit the
    index (another embedder or chunking); the caller must change them (server: 400)."""


class IndexNotFoundError(RetrievalError, LookupError):
    """No index of that name exists under the root (server: 404)."""


class IndexUnavailableError(RetrievalError):
    """The index exists but cannot be used: corrupt files, wrong embedder, escapes the root
    (server: 503; other indexes keep serving)."""


class LoaderError(RetrievalError):
    """A source file could not be turned into text (unsupported, binary, broken PDF)."""
