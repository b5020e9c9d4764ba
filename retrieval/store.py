"""Named indexes under one root: names, info, cached loading, and serialised writes.

Each index is a directory of generations (format: retrieval/generation.py). A write (build,
add, delete) holds the index's lock file, plans what changes (retrieval/ingest.py), writes a
complete new generation, renames it into place and only then switches CURRENT, so a crash at
any point leaves the previous generation current and intact. Readers never wait for writers;
the loaded, searchable generation is an `Index` (retrieval/index.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ragtune.fileio import atomic_directory, atomic_write_text
from retrieval.config import RetrievalConfig
from retrieval.errors import (
    IndexNotFoundError,
    IndexUnavailableError,
    InvalidIndexNameError,
    InvalidSourcesError,
)
from retrieval.generation import (
    CURRENT,
    GENERATION_PATTERN,
    MANIFEST,
    Generation,
    IndexInfo,
    info_from_manifest,
    next_generation,
    prune,
    read_generation,
    write_generation,
)
from retrieval.index import Index, SearchHit
from retrieval.ingest import (
    BuildReport,
    Pending,
    assemble_embeddings,
    chunk_settings,
    compatible,
    pending_files,
    plan_write,
)
from retrieval.loaders import Document

if TYPE_CHECKING:
    from retrieval.embedder import Embedder

logger = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def validate_index_name(name: object) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise InvalidIndexNameError(
            f"invalid index name {name!r}: use 1-64 characters from A-Z a-z 0-9 _ . -, "
            "starting with a letter or digit"
        )
    return name


class IndexStore:
    """All indexes under one root directory.

    `get` caches loaded indexes and notices rebuilds (it re-reads CURRENT, a few bytes, on
    each call), so the server can call it per request. Writes to the same index are
    serialised with a lock file; reads never wait for writes.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        config: RetrievalConfig | None = None,
        embedder: Embedder | None = None,
    ) -> None:
        self.root = Path(root).expanduser()
        self.config = config or RetrievalConfig(root=self.root)
        self._embedder = embedder
        self._embedder_lock = threading.Lock()
        self._cache_lock = threading.Lock()
        self._cache: dict[str, tuple[tuple[str, int], Index | IndexUnavailableError]] = {}
        # called with the index name after a write or delete succeeded (a shared store
        # publishes the new generation: retrieval/mirror.py)
        self.on_change: Callable[[str], None] = lambda name: None

    @classmethod
    def from_config(
        cls,
        config: RetrievalConfig,
        home: Path | None = None,
        embedder: Embedder | None = None,
    ) -> IndexStore:
        return cls(config.resolve_root(home), config=config, embedder=embedder)

    # -- embedder ------------------------------------------------------------------

    @property
    def embedder(self) -> Embedder:
        """The shared embedder, created on first use (searches in bm25 mode never need it)."""
        with self._embedder_lock:
            if self._embedder is None:
                from retrieval.embedder import Embedder

                self._embedder = Embedder(self.config.embedder, batch_size=self.config.batch_size)
            return self._embedder

    # -- paths ---------------------------------------------------------------------

    def _index_dir(self, name: str) -> Path:
        validate_index_name(name)
        directory = self.root / name
        root = self.root.resolve()
        if directory.exists() and directory.resolve().parent != root:
            raise IndexUnavailableError(f"index {name!r} resolves outside the index root")
        return directory

    def _current(self, name: str) -> tuple[Path, str, int]:
        """(generation dir, generation name, CURRENT mtime) or IndexNotFoundError."""
        directory = self._index_dir(name)
        current = directory / CURRENT
        try:
            stat = current.stat()
            generation = current.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            raise IndexNotFoundError(f"index {name!r} not found") from None
        except OSError as exc:
            raise IndexUnavailableError(f"index {name!r}: cannot read CURRENT ({exc})") from exc
        if not GENERATION_PATTERN.fullmatch(generation):
            raise IndexUnavailableError(f"index {name!r}: CURRENT is corrupt")
        return directory / generation, generation, stat.st_mtime_ns

    # -- reading -------------------------------------------------------------------

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            entry.name
            for entry in self.root.iterdir()
            if NAME_PATTERN.fullmatch(entry.name) and (entry / CURRENT).is_file()
        )

    def exists(self, name: str) -> bool:
        try:
            self._current(name)
        except IndexNotFoundError:
            return False
        return True

    def info(self, name: str) -> IndexInfo:
        """Manifest-level facts, without loading vectors (IndexUnavailableError if unreadable)."""
        directory, _, _ = self._current(name)
        try:
            manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
            return info_from_manifest(name, directory, manifest)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise IndexUnavailableError(f"index {name!r} is unavailable: {exc}") from exc

    def list_indexes(self) -> list[IndexInfo | IndexUnavailableError]:
        """One entry per index; unreadable ones appear as their error instead of hiding."""
        entries: list[IndexInfo | IndexUnavailableError] = []
        for name in self.names():
            try:
                entries.append(self.info(name))
            except IndexUnavailableError as exc:
                entries.append(exc)
            except IndexNotFoundError:
                continue  # deleted meanwhile
        return entries

    def get(self, name: str) -> Index:
        """The loaded index (cached per generation). IndexNotFoundError for unknown names,
        IndexUnavailableError if its files are corrupt or inconsistent."""
        for attempt in range(2):
            directory, generation, mtime = self._current(name)
            key = (generation, mtime)
            with self._cache_lock:
                cached = self._cache.get(name)
            if cached is not None and cached[0] == key:
                if isinstance(cached[1], IndexUnavailableError):
                    raise cached[1]
                return cached[1]
            try:
                index = Index.load(name, directory, self.config, lambda: self.embedder)
            except Exception as exc:
                if attempt == 0 and self._current(name)[1] != generation:
                    continue  # rebuilt while we were loading: retry with the new generation
                logger.warning("index %r is unavailable: %s", name, exc)
                error = IndexUnavailableError(f"index {name!r} is unavailable: {exc}")
                error.__cause__ = exc
                with self._cache_lock:
                    self._cache[name] = (key, error)
                raise error from exc
            with self._cache_lock:
                self._cache[name] = (key, index)
            return index
        raise IndexUnavailableError(f"index {name!r} changed twice while loading; retry")

    def search(self, name: str, query: str, **kwargs: Any) -> list[SearchHit]:
        return self.get(name).search(query, **kwargs)

    # -- writing -------------------------------------------------------------------

    @contextlib.contextmanager
    def _write_lock(self, name: str) -> Iterator[None]:
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / f"{name}.lock", "w") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def build(
        self, name: str, sources: Sequence[str | Path], *, progress: bool | None = None
    ) -> BuildReport:
        """Create or replace `name` with exactly the documents under `sources`; documents
        whose content hash is already indexed reuse their chunks and embeddings."""
        validate_index_name(name)
        report = self._write(name, pending_files(sources), replace=True, progress=progress)
        self.on_change(name)
        return report

    def add(
        self, name: str, sources: Sequence[str | Path], *, progress: bool | None = None
    ) -> BuildReport:
        """Add or refresh documents in an existing index; others stay as they are."""
        self._current(name)  # fail fast (unknown name) before hashing the sources
        report = self._write(name, pending_files(sources), replace=False, progress=progress)
        self.on_change(name)
        return report

    def build_documents(
        self,
        name: str,
        documents: Iterable[Document],
        *,
        replace: bool = True,
        progress: bool | None = None,
    ) -> BuildReport:
        """Like build/add for documents that are already in memory (uploads, benchmarks)."""
        pending = [Pending(doc.source, doc.doc_hash, (lambda doc=doc: doc)) for doc in documents]
        report = self._write(name, pending, replace=replace, progress=progress)
        self.on_change(name)
        return report

    def delete(self, name: str) -> None:
        """Remove the index; readers see IndexNotFoundError from the next `get`."""
        with self._write_lock(name):
            self._current(name)
            directory = self._index_dir(name)
            trash = self.root / f".{name}.deleted-{uuid.uuid4().hex[:8]}"
            os.replace(directory, trash)
            shutil.rmtree(trash, ignore_errors=True)
        with self._cache_lock:
            self._cache.pop(name, None)
        self.on_change(name)

    def _write(
        self, name: str, pending: list[Pending], *, replace: bool, progress: bool | None
    ) -> BuildReport:
        started = time.perf_counter()
        report = BuildReport(name=validate_index_name(name))
        show_progress = not _quiet(progress)
        with self._write_lock(name):
            directory = self._index_dir(name)
            old = self._read_for_update(name, replace=replace)
            embedder = self.embedder
            counter = embedder.token_counter()
            settings = chunk_settings(self.config, counter)
            reuse = old is not None and compatible(old.manifest, embedder, settings)
            if old is not None and not replace and not reuse:
                raise InvalidSourcesError(
                    f"index {name!r} was built with another embedder or chunk settings; "
                    "rebuild it with `ragtune index build`"
                )
            plan = plan_write(
                name, old, pending, report, replace=replace, reuse=reuse, config=self.config,
                counter=counter, show_progress=show_progress,
            )  # fmt: skip
            documents, chunks = plan.documents, plan.chunks
            if old is not None and not plan.changed:
                report.generation = old.manifest["generation"]
                report.documents, report.chunks = len(documents), len(chunks)
                report.seconds = time.perf_counter() - started
                logger.info("index %s: no document changed; kept %s", name, report.generation)
                return report
            if not chunks:
                raise InvalidSourcesError(
                    f"index {name!r} would be empty: no text found in the sources"
                )

            embeddings, report.embedded_chunks = assemble_embeddings(
                chunks, plan.rows, old, embedder, show_progress
            )
            generation = next_generation(directory)
            with atomic_directory(directory / generation) as scratch:
                write_generation(
                    scratch, name=name, generation=generation, old=old, documents=documents,
                    chunks=chunks, embeddings=embeddings, embedder=embedder, settings=settings,
                    config=self.config, show_progress=show_progress,
                )  # fmt: skip
            atomic_write_text(directory / CURRENT, generation + "\n")
            prune(directory, keep={generation, old.manifest["generation"] if old else ""})
        report.generation = generation
        report.documents = len(documents)
        report.chunks = len(chunks)
        report.seconds = time.perf_counter() - started
        logger.info(
            "index %s %s: %d documents, %d chunks (%d embedded) in %.1fs",
            name, generation, report.documents, report.chunks, report.embedded_chunks,
            report.seconds,
        )  # fmt: skip
        return report

    def _read_for_update(self, name: str, *, replace: bool) -> Generation | None:
        try:
            directory, _, _ = self._current(name)
        except IndexNotFoundError:
            if replace:
                return None
            raise IndexNotFoundError(
                f"index {name!r} not found; create it with `ragtune index build`"
            ) from None
        try:
            return read_generation(directory)
        except Exception as exc:
            if replace:
                logger.warning("replacing unreadable index %r (%s)", name, exc)
                return None
            raise IndexUnavailableError(
                f"index {name!r} is unavailable ({exc}); rebuild it with `ragtune index build`"
            ) from exc


def _quiet(progress: bool | None) -> bool:
    """Progress bars: shown when asked, or by default when stderr is a terminal."""
    if progress is None:
        return not sys.stderr.isatty()
    return not progress
