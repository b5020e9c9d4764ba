"""Adapter directories must lie inside the configured roots, symlinks included."""

from __future__ import annotations

from pathlib import Path

from server.adapters.errors import AdapterError


def confine(path: str, roots: list[Path]) -> Path:
    """Resolve `path` (relative paths are taken against the first root) and require that it
    and every file in it stay inside one of `roots` after following symlinks."""
    try:
        return _confine(path, roots)
    except (OSError, ValueError) as exc:  # NUL bytes, names too long, unreadable directories
        raise AdapterError(f"{path!r} cannot be used as an adapter path: {exc}") from None


def _confine(path: str, roots: list[Path]) -> Path:
    if not roots:
        raise AdapterError("no adapter roots are configured (adapters.roots)")
    candidate = Path(path).expanduser()
    if not candidate.is_absolute():
        candidate = roots[0] / candidate
    if ".." in Path(path).parts:
        raise AdapterError(f"{path!r}: '..' is not allowed in adapter paths")
    resolved = candidate.resolve()
    real_roots = [root.resolve() for root in roots]
    root = next((r for r in real_roots if resolved == r or r in resolved.parents), None)
    if root is None:
        allowed = ", ".join(str(r) for r in real_roots)
        raise AdapterError(
            f"{path!r} is outside the adapter roots ({allowed}); "
            "copy it under a root or add one to adapters.roots"
        )
    if not resolved.is_dir():
        raise AdapterError(f"{path!r} is not a directory")
    for entry in resolved.iterdir():
        target = entry.resolve()
        if root != target and root not in target.parents:
            raise AdapterError(f"{entry.name} in {path!r} links outside the adapter root")
    return resolved
