"""Adapter directories must lie inside the configured roots, symlinks included."""

from __future__ import annotations

from pathlib import Path

from ragtune.paths import PathNotAllowedError, inside
from ragtune.paths import confine as confine_path
from server.adapters.errors import AdapterError


def confine(path: str, roots: list[Path]) -> Path:
    """Resolve `path` (relative paths are taken against the first root) and require that it
    and every file in it stay inside one of `roots` after following symlinks."""
    try:
        resolved, root = confine_path(path, roots, "adapter")
        if not resolved.is_dir():
            raise AdapterError(f"{path!r} is not a directory")
        if resolved.name.startswith("."):
            raise AdapterError(
                f"{path!r} is a hidden directory, such as the scratch of an unfinished write; "
                "load the finished adapter directory"
            )
        for entry in resolved.iterdir():
            if not inside(entry, root):
                raise AdapterError(f"{entry.name} in {path!r} links outside the adapter root")
    except PathNotAllowedError as exc:
        raise AdapterError(f"{exc}; copy it under a root or add one to adapters.roots") from None
    except OSError as exc:  # unreadable directories
        raise AdapterError(f"{path!r} cannot be used as an adapter path: {exc}") from None
    return resolved
