"""The one store replicas share: adapters (every version), indexes and the registry's state.

`store.url` is an fsspec URL. Unset, it is the local `$RAGTUNE_HOME`; a local path (or
`file://`) is used in place (a shared filesystem needs no copy); anything else (`s3://bucket/
prefix` through s3fs) is mirrored into a local cache, because the engine and FAISS read files.

Readers never see half a write:
- small documents (the registry's state, an index's CURRENT pointer) are one object each:
  one PUT on S3, write-then-rename locally;
- directories (an adapter version, an index generation) are published files first, then a
  `_COMPLETE.json` listing every file's size and SHA-256, last. A reader trusts a directory
  only through that manifest and checks every file it downloads against it, so a directory
  that is still uploading, or being replaced, is never used half-written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path, PurePosixPath
from typing import Any

from ragtune.fileio import atomic_directory, atomic_write_text, sha256_file

logger = logging.getLogger(__name__)

COMPLETE = "_COMPLETE.json"


class StoreError(RuntimeError):
    """The store is unreachable, or a directory in it is incomplete or corrupt."""


def _rel(rel: str) -> str:
    """A store-relative path: no absolute paths, no '..', no empty parts."""
    parts = PurePosixPath(rel).parts
    if not parts or rel.startswith("/") or any(p in ("..", ".", "") for p in parts):
        raise StoreError(f"invalid store path {rel!r}")
    return "/".join(parts)


class Store:
    """A local directory, or a remote fsspec location mirrored into `cache_dir`."""

    def __init__(
        self,
        url: str | None,
        home: Path,
        cache_dir: Path | None = None,
        options: dict[str, Any] | None = None,
    ) -> None:
        self.url = url or str(home)
        self.fs = None
        self.root = ""
        if is_remote(url):
            import fsspec

            # listings are never cached: another replica may have written a moment ago
            self.fs, self.root = fsspec.core.url_to_fs(
                url, use_listings_cache=False, skip_instance_cache=True, **(options or {})
            )
            self.root = self.root.rstrip("/")
        self.local_root = local_root(url, home, cache_dir)
        self.local_root.mkdir(parents=True, exist_ok=True)

    @property
    def remote(self) -> bool:
        return self.fs is not None

    def local(self, rel: str) -> Path:
        """Where `rel` lives on this machine (the store itself, or its cache)."""
        return self.local_root / _rel(rel)

    def _path(self, rel: str) -> str:
        return f"{self.root}/{_rel(rel)}"

    # ---------------------------------------------------------------- small documents
    def read_text(self, rel: str) -> str | None:
        """The document's text, or None when there is none."""
        if not self.remote:
            try:
                return self.local(rel).read_text(encoding="utf-8")
            except FileNotFoundError:
                return None
        try:
            return self.fs.cat_file(self._path(rel)).decode("utf-8")
        except FileNotFoundError:
            return None

    def write_text(self, rel: str, text: str) -> None:
        """Replace the document whole (one PUT, or write-then-rename)."""
        if not self.remote:
            atomic_write_text(self.local(rel), text)
        else:
            self.fs.pipe_file(self._path(rel), text.encode("utf-8"))

    def read_json(self, rel: str) -> Any:
        text = self.read_text(rel)
        return None if text is None else json.loads(text)

    def write_json(self, rel: str, data: Any) -> None:
        self.write_text(rel, json.dumps(data, indent=1, sort_keys=True))

    def list_dir(self, rel: str) -> list[str]:
        """Names directly under `rel` (none when it does not exist)."""
        if not self.remote:
            directory = self.local(rel)
            return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
        try:
            entries = self.fs.ls(self._path(rel), detail=False)
        except FileNotFoundError:
            return []
        return sorted({PurePosixPath(e).name for e in entries})

    def delete(self, rel: str) -> None:
        """Remove a document or a whole directory (missing is fine)."""
        if not self.remote:
            target = self.local(rel)
            if target.is_dir():
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)
            return
        path = self._path(rel)
        try:
            if self.fs.isdir(path):
                self.fs.rm(path, recursive=True)
            else:
                self.fs.rm_file(path)
        except FileNotFoundError:
            pass

    # ------------------------------------------------------------------ directories
    def publish_dir(self, rel: str, source: Path) -> str:
        """Put `source`'s files at `rel`, then its manifest; returns the content digest.
        The same content published again leaves the store as it is: other servers hold
        those very files (a version never changes behind its name), and rewriting them
        would make their copies look changed on disk."""
        manifest = directory_manifest(source)
        published = self.manifest(rel)
        if published is not None and published.get("digest") == manifest["digest"]:
            return manifest["digest"]
        if not self.remote:
            target = self.local(rel)
            if target.resolve() != source.resolve():
                with atomic_directory(target) as scratch:
                    for name in manifest["files"]:
                        (scratch / name).parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(source / name, scratch / name)
                    atomic_write_text(scratch / COMPLETE, json.dumps(manifest, indent=1))
            else:
                atomic_write_text(target / COMPLETE, json.dumps(manifest, indent=1))
            return manifest["digest"]
        base = self._path(rel)
        # the old manifest goes first: from here readers treat the directory as unfinished
        self.delete(f"{rel}/{COMPLETE}")
        for name in manifest["files"]:
            self.fs.put_file(str(source / name), f"{base}/{name}")
        self.fs.pipe_file(f"{base}/{COMPLETE}", json.dumps(manifest, indent=1).encode())
        return manifest["digest"]

    def manifest(self, rel: str) -> dict[str, Any] | None:
        """A published directory's manifest (None: absent or still being written)."""
        return self.read_json(f"{_rel(rel)}/{COMPLETE}")

    def fetch_dir(self, rel: str) -> Path:
        """A complete local copy of the published directory `rel` (downloaded once; files
        checked against the manifest). Local stores return the directory itself."""
        target = self.local(rel)
        if not self.remote:
            if not target.is_dir():
                raise StoreError(f"{rel} is not in the store")
            return target
        manifest = self.manifest(rel)
        if manifest is None:
            raise StoreError(f"{rel} is not in the store, or its upload has not finished")
        if _read_local_manifest(target) == manifest:
            return target
        base = self._path(rel)
        with atomic_directory(target) as scratch:
            for name, facts in manifest["files"].items():
                path = scratch / name
                path.parent.mkdir(parents=True, exist_ok=True)
                old = target / name
                if old.is_file() and sha256_file(old) == facts["sha256"]:
                    shutil.copy2(old, path)  # unchanged since the last version we fetched
                else:
                    self.fs.get_file(f"{base}/{name}", str(path))
                if path.stat().st_size != facts["size"] or sha256_file(path) != facts["sha256"]:
                    raise StoreError(f"{rel}/{name} changed while it was downloaded; retry")
            atomic_write_text(scratch / COMPLETE, json.dumps(manifest, indent=1))
        return target


def directory_manifest(source: Path) -> dict[str, Any]:
    """Every regular file under `source` (hidden scratch and the manifest left out) with its
    size and SHA-256, and one digest over them all."""
    if not source.is_dir():
        raise StoreError(f"{source} is not a directory")
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        name = relative.as_posix()
        if name == COMPLETE or any(part.startswith(".") for part in relative.parts):
            continue
        if path.is_symlink():
            raise StoreError(f"{name} in {source} is a symbolic link; publish real files")
        if path.is_file():
            files[name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return {"files": files, "digest": digest}


def _read_local_manifest(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / COMPLETE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_remote(url: str | None) -> bool:
    return bool(url) and "://" in url and not url.startswith("file://")


def local_root(url: str | None, home: Path, cache_dir: Path | None = None) -> Path:
    """The directory servers read: a local store itself, or a remote store's cache."""
    if is_remote(url):
        tag = hashlib.sha256(url.encode()).hexdigest()[:12]
        return (cache_dir or home / "store-cache") / tag
    return Path(url.removeprefix("file://") if url else home).expanduser()


def open_store(settings: Any) -> Store:
    """The store `settings.store` names (the local `$RAGTUNE_HOME` when its url is unset)."""
    config = settings.store
    return Store(config.url, settings.home, config.cache_dir, dict(config.options))
