"""Paths that clients name (adapter directories, documents to index) must stay inside the
configured roots, after following symlinks."""

from __future__ import annotations

from pathlib import Path


class PathNotAllowedError(ValueError):
    """The path is outside every configured root, or unusable (NUL bytes, '..')."""


def confine(path: str, roots: list[Path], what: str = "path") -> tuple[Path, Path]:
    """Resolve `path` (relative paths are taken against the first root) and return it with
    the root that holds it; raise PathNotAllowedError otherwise."""
    if not roots:
        raise PathNotAllowedError(f"no roots are configured for {what}s")
    try:
        if ".." in Path(path).parts:
            raise PathNotAllowedError(f"{path!r}: '..' is not allowed in {what} paths")
        candidate = Path(path).expanduser()
        if not candidate.is_absolute():
            candidate = roots[0] / candidate
        resolved = candidate.resolve()
        real_roots = [root.resolve() for root in roots]
    except (OSError, ValueError) as exc:  # NUL bytes, names too long, loops
        if isinstance(exc, PathNotAllowedError):
            raise
        raise PathNotAllowedError(f"{path!r} cannot be used as a {what}: {exc}") from None
    root = next((r for r in real_roots if resolved == r or r in resolved.parents), None)
    if root is None:
        allowed = ", ".join(str(r) for r in real_roots)
        raise PathNotAllowedError(f"{path!r} is outside the {what} roots ({allowed})")
    return resolved, root


def inside(path: Path, root: Path) -> bool:
    """True when `path`, symlinks followed, is `root` or below it."""
    target = path.resolve()
    return target == root or root in target.parents
