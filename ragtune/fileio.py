"""Crash-safe file writes: write beside the target, fsync, then rename over it."""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a scratch directory that replaces `target` only if the block completes.

    A crash (or kill -9) mid-write leaves `target` as it was; the scratch directory is a
    dot-prefixed sibling that the next write to the same target removes. Each writer holds an
    flock on its scratch directory while it works (the kernel drops it when the process dies),
    so only scratch whose writer is gone is removed, never a concurrent writer's.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    _restore_backup(target)
    _remove_stale_scratch(target)
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    lock = os.open(scratch, os.O_RDONLY)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        yield scratch
        _fsync_tree(scratch)  # the data is on disk before the rename makes it visible
        backup = None
        if target.exists():
            backup = _backup_path(target)
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(target, backup)
        os.replace(scratch, target)
        _fsync_dir(target.parent)  # the rename itself survives a power loss
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    finally:
        os.close(lock)


def _fsync_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*"), reverse=True):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _backup_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def _restore_backup(target: Path) -> None:
    """A writer killed between moving `target` aside and moving its replacement in leaves
    only the backup: put it back, so the target is never lost."""
    backup = _backup_path(target)
    if backup.is_dir() and not target.exists():
        os.replace(backup, target)


def _remove_stale_scratch(target: Path) -> None:
    """Remove scratch directories of `target` left by writers that died (unlocked ones)."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.[A-Za-z0-9_]+\.tmp")
    for scratch in target.parent.iterdir():
        if not pattern.fullmatch(scratch.name):
            continue
        try:
            fd = os.open(scratch, os.O_RDONLY)
        except OSError:
            continue  # removed meanwhile, or not a directory we can open
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live writer holds it
        else:
            shutil.rmtree(scratch, ignore_errors=True)
        finally:
            os.close(fd)


def append_line(path: Path, line: str) -> None:
    """Append one line with a single O_APPEND write, fsynced: concurrent writers never
    interleave inside a line, and a crash can only leave the last line torn (readers skip
    a line that does not parse). New files are private (0600)."""
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        written = os.write(fd, data)
        if written != len(data):  # a full disk; never leave half a record unmarked
            os.write(fd, b"\n")
            raise OSError(f"short write to {path}: {written} of {len(data)} bytes")
        os.fsync(fd)
    finally:
        os.close(fd)
