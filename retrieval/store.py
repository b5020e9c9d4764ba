"""Named indexes on disk: build, incremental add, delete, load and search.

Layout of one index (``<root>/<name>/``)::

    CURRENT                 "gen-000007": the generation readers use
    gen-000007/
        manifest.json       format, embedder, chunking, counts, sha256 of every other file
        documents.json      one record per source document (hash, title, chunk range)
        chunks.jsonl        one chunk per line (id, source, title, heading, span, text)
        embeddings.npy      float32 (chunks, dim), L2-normalised
        dense.faiss         only for HNSW indexes (flat ones are rebuilt from the .npy)
        lexical/            bm25s arrays (.npy, allow_pickle=False) and vocab JSON

A write builds a complete new generation in a scratch directory, renames it into place
(`atomic_directory`) and only then switches CURRENT (`atomic_write_text`): a crash at any
point leaves the previous generation current and intact. The generation before the current
one is kept so a reader that read CURRENT just before a switch can still load it.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ragtune.fileio import atomic_directory, atomic_write_text, sha256_file
from retrieval.chunking import Chunk, TokenCounter, chunk_document
from retrieval.config import SEARCH_MODES, RetrievalConfig
from retrieval.errors import (
    IndexNotFoundError,
    IndexUnavailableError,
    InvalidIndexNameError,
    InvalidSourcesError,
    LoaderError,
)
from retrieval.loaders import Document, file_hash, iter_source_files, load_file, source_key

if TYPE_CHECKING:
    from retrieval.dense import DenseIndex
    from retrieval.embedder import Embedder
    from retrieval.lexical import LexicalIndex

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_GENERATION = re.compile(r"^gen-(\d{6,})$")
CURRENT = "CURRENT"
MANIFEST = "manifest.json"
DOCUMENTS = "documents.json"
CHUNKS = "chunks.jsonl"
EMBEDDINGS = "embeddings.npy"
DENSE = "dense.faiss"
LEXICAL = "lexical"
MAX_TOP_K = 1000


def validate_index_name(name: object) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise InvalidIndexNameError(
            f"invalid index name {name!r}: use 1-64 characters from A-Z a-z 0-9 _ . -, "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class SearchHit:
    """One retrieved chunk. `score` is the cosine (dense), BM25 score (bm25) or fused score
    (hybrid); only its order is comparable across modes."""

    index: str
    source: str
    chunk_id: str
    score: float
    text: str
    title: str
    heading: tuple[str, ...]
    start: int
    end: int
    doc_hash: str
    rank: int

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["heading"] = list(self.heading)
        return data


@dataclass(frozen=True)
class IndexInfo:
    name: str
    path: str
    generation: str
    documents: int
    chunks: int
    dense: str
    embedder: dict[str, Any]
    chunking: dict[str, Any]
    created_at: str
    updated_at: str
    size_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BuildReport:
    """What a build/add did; `embedded_chunks` counts only chunks that went through the model."""

    name: str
    generation: str = ""
    documents: int = 0
    chunks: int = 0
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    embedded_chunks: int = 0
    seconds: float = 0.0

    @property
    def chunks_per_second(self) -> float:
        return self.embedded_chunks / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["chunks_per_second"] = round(self.chunks_per_second, 2)
        return data


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ---------------------------------------------------------------------------- loading


@dataclass
class _Generation:
    """The raw contents of one generation, as read from disk for an update."""

    manifest: dict[str, Any]
    documents: list[dict[str, Any]]
    chunks: list[Chunk]
    embeddings: np.ndarray


def _read_generation(directory: Path, verify: bool = True) -> _Generation:
    manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"unsupported index format {manifest.get('format_version')!r}")
    if verify:
        for relative, expected in manifest["files"].items():
            path = directory / relative
            if not path.resolve().is_relative_to(directory.resolve()):
                raise ValueError(f"manifest names a file outside the index: {relative!r}")
            if not path.is_file():
                raise ValueError(f"missing file {relative}")
            if sha256_file(path) != expected:
                raise ValueError(f"checksum mismatch for {relative}")
    documents = json.loads((directory / DOCUMENTS).read_text(encoding="utf-8"))
    with open(directory / CHUNKS, encoding="utf-8") as handle:
        chunks = [Chunk.from_json(json.loads(line)) for line in handle if line.strip()]
    embeddings = np.load(directory / EMBEDDINGS, allow_pickle=False)
    expected_shape = (manifest["counts"]["chunks"], manifest["embedder"]["dim"])
    if len(chunks) != expected_shape[0] or embeddings.shape != expected_shape:
        raise ValueError(
            f"{len(chunks)} chunks and embeddings {embeddings.shape} do not match the "
            f"manifest {expected_shape}"
        )
    if embeddings.dtype != np.float32:
        raise ValueError(f"embeddings have dtype {embeddings.dtype}, expected float32")
    return _Generation(manifest, documents, chunks, embeddings)


class Index:
    """A loaded, immutable index generation. `search` is safe from many threads at once:
    the FAISS and BM25 structures are only read, and the shared Embedder serialises its own
    forward passes."""

    def __init__(
        self,
        name: str,
        info: IndexInfo,
        chunks: list[Chunk],
        dense: DenseIndex,
        lexical: LexicalIndex,
        embedder_provider: Any,
        config: RetrievalConfig | None = None,
    ) -> None:
        self.name = name
        self._config = config or RetrievalConfig()
        self.info = info
        self.chunks = chunks
        self._dense = dense
        self._lexical = lexical
        self._embedder_provider = embedder_provider

    def __len__(self) -> int:
        return len(self.chunks)

    @classmethod
    def load(
        cls,
        name: str,
        directory: Path,
        config: RetrievalConfig,
        embedder_provider: Any,
        *,
        verify: bool = True,
    ) -> Index:
        from retrieval.dense import DenseIndex
        from retrieval.lexical import LexicalIndex

        generation = _read_generation(directory, verify=verify)
        manifest = generation.manifest
        if manifest["dense"]["kind"] == "hnsw":
            dense = DenseIndex.load(directory / DENSE, ef_search=config.hnsw_ef_search)
        else:
            flat_only = len(generation.chunks) + 1
            dense = DenseIndex.build(generation.embeddings, hnsw_threshold=flat_only)
        lexical = LexicalIndex.load(directory / LEXICAL)
        if dense.size != len(generation.chunks) or lexical.size != len(generation.chunks):
            raise ValueError("dense or lexical index size does not match the chunk count")
        info = _info_from_manifest(name, directory, manifest)
        return cls(name, info, generation.chunks, dense, lexical, embedder_provider, config)

    def _embedder(self) -> Embedder:
        embedder = self._embedder_provider()
        expected = self.info.embedder.get("fingerprint")
        if embedder.fingerprint != expected:
            raise IndexUnavailableError(
                f"index {self.name!r} was built with embedder {self.info.embedder.get('name')} "
                f"({expected}); the configured one is {embedder.name} ({embedder.fingerprint}). "
                "Rebuild the index."
            )
        return embedder

    def search(
        self,
        query: str,
        top_k: int = 5,
        mode: str = "hybrid",
        min_score: float | None = None,
    ) -> list[SearchHit]:
        """The best `top_k` chunks for `query`, best first, dropping hits below `min_score`
        (compared with the score of the chosen mode). BM25 never returns chunks that share
        no term with the query."""
        if not isinstance(query, str) or not query.strip():
            raise ValueError("query must be a non-empty string")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= MAX_TOP_K:
            raise ValueError(f"top_k must be an integer from 1 to {MAX_TOP_K}")
        if mode not in SEARCH_MODES:
            raise ValueError(f"mode must be one of {', '.join(SEARCH_MODES)}; got {mode!r}")
        if mode == "bm25":
            ids, scores = self._lexical.search(query, top_k)
        else:
            query_vector = self._embedder().embed([query])[0]
            if mode == "dense":
                ids, scores = self._dense.search(query_vector, top_k)
            else:
                ids, scores = self._hybrid(query, query_vector, top_k)
        hits = []
        for idx, score in zip(ids.tolist(), scores.tolist(), strict=True):
            if min_score is not None and score < min_score:
                continue
            chunk = self.chunks[idx]
            hits.append(
                SearchHit(
                    index=self.name,
                    source=chunk.source,
                    chunk_id=chunk.chunk_id,
                    score=float(score),
                    text=chunk.text,
                    title=chunk.title,
                    heading=chunk.heading,
                    start=chunk.start,
                    end=chunk.end,
                    doc_hash=chunk.doc_hash,
                    rank=len(hits) + 1,
                )
            )
        return hits

    def _hybrid(
        self, query: str, query_vector: np.ndarray, top_k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        from retrieval.fusion import fuse
        from retrieval.lexical import top_k_positive

        pool = max(self._config.hybrid_pool, 4 * top_k)
        dense_ids, _ = self._dense.search(query_vector, pool)
        lexical_all = self._lexical.scores(query)
        lexical_ids, _ = top_k_positive(lexical_all, pool)
        candidates = np.unique(np.concatenate([dense_ids, lexical_ids]))
        # Exact scores for every candidate in both modes, so neither list's misses count
        # as zero similarity.
        dense_scores = self._dense.vectors(candidates) @ query_vector
        fused = fuse(
            dense_scores,
            lexical_all[candidates],
            self._config.fusion,
            self._config.dense_weight,
        )
        order = np.argsort(-fused, kind="stable")[:top_k]
        return candidates[order], fused[order]


def _info_from_manifest(name: str, directory: Path, manifest: dict[str, Any]) -> IndexInfo:
    size = sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())
    return IndexInfo(
        name=name,
        path=str(directory),
        generation=directory.name,
        documents=int(manifest["counts"]["documents"]),
        chunks=int(manifest["counts"]["chunks"]),
        dense=str(manifest["dense"]["kind"]),
        embedder=dict(manifest["embedder"]),
        chunking=dict(manifest["chunking"]),
        created_at=str(manifest["created_at"]),
        updated_at=str(manifest["updated_at"]),
        size_bytes=size,
    )


# ---------------------------------------------------------------------------- store


@dataclass
class _Pending:
    """A document to (re)index: known hash, text loaded only if its hash is new."""

    source: str
    doc_hash: str
    load: Any  # () -> Document


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
        if not _GENERATION.fullmatch(generation):
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
            return _info_from_manifest(name, directory, manifest)
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
        report = self._write(name, self._pending_files(sources), replace=True, progress=progress)
        self.on_change(name)
        return report

    def add(
        self, name: str, sources: Sequence[str | Path], *, progress: bool | None = None
    ) -> BuildReport:
        """Add or refresh documents in an existing index; others stay as they are."""
        self._current(name)  # fail fast (unknown name) before hashing the sources
        report = self._write(name, self._pending_files(sources), replace=False, progress=progress)
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
        pending = [_Pending(doc.source, doc.doc_hash, (lambda doc=doc: doc)) for doc in documents]
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

    def _pending_files(self, sources: Sequence[str | Path]) -> list[_Pending]:
        if not sources:
            raise InvalidSourcesError("no sources given")
        pending = []
        for path in iter_source_files(sources):
            digest = file_hash(path)
            pending.append(
                _Pending(
                    source_key(path),
                    digest,
                    (lambda path=path, digest=digest: load_file(path, doc_hash=digest)),
                )
            )
        return pending

    def _write(
        self, name: str, pending: list[_Pending], *, replace: bool, progress: bool | None
    ) -> BuildReport:
        from tqdm.auto import tqdm

        started = time.perf_counter()
        report = BuildReport(name=validate_index_name(name))
        with self._write_lock(name):
            directory = self._index_dir(name)
            old = self._read_for_update(name, replace=replace)
            embedder = self.embedder
            counter = embedder.token_counter()
            settings = self._chunk_settings(counter)
            compatible = old is not None and self._compatible(old.manifest, embedder, settings)
            if old is not None and not replace and not compatible:
                raise InvalidSourcesError(
                    f"index {name!r} was built with another embedder or chunk settings; "
                    "rebuild it with `ragtune index build`"
                )
            old_docs = {record["source"]: record for record in old.documents} if old else {}
            # Embeddings are a pure function of the embedded text: any chunk whose text was
            # embedded before (unchanged parts of an edited file, a renamed file) reuses it.
            known_rows: dict[str, int] = {}
            if old is not None and compatible:
                for row, chunk in enumerate(old.chunks):
                    known_rows.setdefault(chunk.embedding_text(), row)

            final: dict[str, _Pending | dict[str, Any]] = {}
            if old is not None and not replace:
                final.update(old_docs)
            for item in pending:
                final[item.source] = item

            chunks: list[Chunk] = []
            rows: list[int] = []  # row in old.embeddings, or -1 to embed now
            documents: list[dict[str, Any]] = []
            for source, item in tqdm(
                list(final.items()), desc=f"chunk {name}", unit="doc", disable=_quiet(progress)
            ):
                previous = old_docs.get(source)
                if isinstance(item, dict) or (
                    compatible and previous is not None and previous["doc_hash"] == item.doc_hash
                ):
                    assert previous is not None
                    first, count = previous["first_chunk"], previous["chunks"]
                    doc_chunks = old.chunks[first : first + count] if old else []
                    doc_rows = list(range(first, first + count))
                    title, kind = previous["title"], previous["kind"]
                    doc_hash = previous["doc_hash"]
                    if not isinstance(item, dict):
                        report.unchanged.append(source)
                else:
                    try:
                        doc = item.load()
                    except (LoaderError, OSError) as exc:
                        logger.warning("skipping %s: %s", source, exc)
                        report.skipped.append((source, str(exc)))
                        continue
                    doc_chunks = chunk_document(
                        doc, self.config.chunk_tokens, self.config.chunk_overlap, counter
                    )
                    doc_rows = [known_rows.get(c.embedding_text(), -1) for c in doc_chunks]
                    title, kind, doc_hash = doc.title, doc.kind, doc.doc_hash
                    (report.updated if previous is not None else report.added).append(source)
                documents.append(
                    {
                        "source": source,
                        "doc_hash": doc_hash,
                        "title": title,
                        "kind": kind,
                        "first_chunk": len(chunks),
                        "chunks": len(doc_chunks),
                    }
                )
                chunks.extend(doc_chunks)
                rows.extend(doc_rows)
            if replace:
                report.removed = sorted(set(old_docs) - set(final))
            changed = report.added or report.updated or report.removed
            dropped = any(source in old_docs for source, _ in report.skipped)
            if old is not None and not changed and not dropped:
                report.generation = old.manifest["generation"]
                report.documents, report.chunks = len(documents), len(chunks)
                report.seconds = time.perf_counter() - started
                logger.info("index %s: no document changed; kept %s", name, report.generation)
                return report
            if not chunks:
                raise InvalidSourcesError(
                    f"index {name!r} would be empty: no text found in the sources"
                )

            embeddings, report.embedded_chunks = self._assemble(
                chunks, rows, old, embedder, progress
            )
            generation = _next_generation(directory)
            with atomic_directory(directory / generation) as scratch:
                self._write_generation(
                    scratch, name, generation, old, documents, chunks, embeddings, embedder,
                    settings, progress,
                )  # fmt: skip
            atomic_write_text(directory / CURRENT, generation + "\n")
            _prune(directory, keep={generation, old.manifest["generation"] if old else ""})
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

    def _read_for_update(self, name: str, *, replace: bool) -> _Generation | None:
        try:
            directory, _, _ = self._current(name)
        except IndexNotFoundError:
            if replace:
                return None
            raise IndexNotFoundError(
                f"index {name!r} not found; create it with `ragtune index build`"
            ) from None
        try:
            return _read_generation(directory)
        except Exception as exc:
            if replace:
                logger.warning("replacing unreadable index %r (%s)", name, exc)
                return None
            raise IndexUnavailableError(
                f"index {name!r} is unavailable ({exc}); rebuild it with `ragtune index build`"
            ) from exc

    def _chunk_settings(self, counter: TokenCounter) -> dict[str, Any]:
        return {
            "max_tokens": self.config.chunk_tokens,
            "overlap_tokens": self.config.chunk_overlap,
            "token_counter": counter.name,
        }

    @staticmethod
    def _compatible(manifest: dict[str, Any], embedder: Embedder, settings: dict) -> bool:
        return (
            manifest["embedder"].get("fingerprint") == embedder.fingerprint
            and manifest["chunking"] == settings
        )

    @staticmethod
    def _assemble(
        chunks: list[Chunk],
        rows: list[int],
        old: _Generation | None,
        embedder: Embedder,
        progress: bool | None,
    ) -> tuple[np.ndarray, int]:
        """The (chunks, dim) matrix: known rows copied, the rest embedded now (and counted)."""
        matrix = np.zeros((len(chunks), embedder.dim), dtype=np.float32)
        row_array = np.asarray(rows, dtype=np.int64)
        known = np.flatnonzero(row_array >= 0)
        if known.size:
            assert old is not None
            matrix[known] = old.embeddings[row_array[known]]
        missing = np.flatnonzero(row_array < 0)
        if missing.size:
            texts = [chunks[position].embedding_text() for position in missing]
            matrix[missing] = embedder.embed(texts, progress=not _quiet(progress))
        return matrix, int(missing.size)

    def _write_generation(
        self,
        scratch: Path,
        name: str,
        generation: str,
        old: _Generation | None,
        documents: list[dict[str, Any]],
        chunks: list[Chunk],
        embeddings: np.ndarray,
        embedder: Embedder,
        settings: dict[str, Any],
        progress: bool | None,
    ) -> None:
        from retrieval.dense import DenseIndex
        from retrieval.lexical import LexicalIndex

        config = self.config
        (scratch / DOCUMENTS).write_text(
            json.dumps(documents, ensure_ascii=False), encoding="utf-8"
        )
        with open(scratch / CHUNKS, "w", encoding="utf-8") as handle:
            for chunk in chunks:
                handle.write(json.dumps(chunk.to_json(), ensure_ascii=False) + "\n")
        np.save(scratch / EMBEDDINGS, embeddings, allow_pickle=False)
        dense = DenseIndex.build(
            embeddings,
            hnsw_threshold=config.hnsw_threshold,
            hnsw_m=config.hnsw_m,
            ef_construction=config.hnsw_ef_construction,
            ef_search=config.hnsw_ef_search,
        )
        if dense.kind == "hnsw":
            dense.save(scratch / DENSE)
        lexical = LexicalIndex.build(
            [chunk.embedding_text() for chunk in chunks], progress=not _quiet(progress)
        )
        lexical.save(scratch / LEXICAL)
        files = {
            path.relative_to(scratch).as_posix(): sha256_file(path)
            for path in sorted(scratch.rglob("*"))
            if path.is_file()
        }
        now = _now()
        manifest = {
            "format_version": FORMAT_VERSION,
            "name": name,
            "generation": generation,
            "created_at": old.manifest["created_at"] if old else now,
            "updated_at": now,
            "embedder": embedder.describe(),
            "chunking": settings,
            "dense": {"kind": dense.kind, "hnsw_m": config.hnsw_m},
            "lexical": {"kind": "bm25s", "tokenizer": "nfkc-lower-cjk-bigram-v1"},
            "counts": {"documents": len(documents), "chunks": len(chunks)},
            "files": files,
        }
        atomic_write_text(scratch / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False))


def _quiet(progress: bool | None) -> bool:
    """Progress bars: shown when asked, or by default when stderr is a terminal."""
    if progress is None:
        return not sys.stderr.isatty()
    return not progress


def _next_generation(directory: Path) -> str:
    numbers = [0]
    if directory.is_dir():
        for entry in directory.iterdir():
            match = _GENERATION.fullmatch(entry.name)
            if match:
                numbers.append(int(match.group(1)))
    return f"gen-{max(numbers) + 1:06d}"


def _prune(directory: Path, keep: set[str]) -> None:
    """Drop generations other than the current and previous one, and scratch left by a
    crashed writer: generation directories and CURRENT's temporary file (we hold the write
    lock, so no scratch is in use)."""
    for entry in directory.iterdir():
        if entry.name in keep or entry.name == CURRENT:
            continue
        if _GENERATION.fullmatch(entry.name) or (entry.name.startswith(".gen-") and entry.is_dir()):
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.name.startswith(f".{CURRENT}.") and entry.name.endswith(".tmp"):
            entry.unlink(missing_ok=True)
