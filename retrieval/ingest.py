"""Incremental ingest: what one write keeps, re-chunks, embeds or drops.

A document whose content hash is already indexed keeps its chunks and embedding rows; any
chunk whose text was embedded before reuses that row. Only the rest goes through the model.
The store (retrieval/store.py) runs this under its write lock and writes the result as a new
generation (retrieval/generation.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.chunking import Chunk, TokenCounter, chunk_document
from retrieval.config import RetrievalConfig
from retrieval.errors import InvalidSourcesError, LoaderError
from retrieval.generation import Generation
from retrieval.loaders import Document, file_hash, iter_source_files, load_file, source_key

if TYPE_CHECKING:
    from retrieval.embedder import Embedder

logger = logging.getLogger(__name__)


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


@dataclass
class Pending:
    """A document to (re)index: known hash, text loaded only if its hash is new."""

    source: str
    doc_hash: str
    load: Callable[[], Document]


@dataclass
class WritePlan:
    """The next generation's contents, before embedding."""

    documents: list[dict[str, Any]]
    chunks: list[Chunk]
    rows: list[int]  # row in the old embeddings, or -1 to embed now
    changed: bool  # a document was added, updated, removed or dropped (unreadable now)


def pending_files(sources: Sequence[str | Path]) -> list[Pending]:
    if not sources:
        raise InvalidSourcesError("no sources given")
    pending = []
    for path in iter_source_files(sources):
        digest = file_hash(path)
        pending.append(
            Pending(
                source_key(path),
                digest,
                (lambda path=path, digest=digest: load_file(path, doc_hash=digest)),
            )
        )
    return pending


def chunk_settings(config: RetrievalConfig, counter: TokenCounter) -> dict[str, Any]:
    return {
        "max_tokens": config.chunk_tokens,
        "overlap_tokens": config.chunk_overlap,
        "token_counter": counter.name,
    }


def compatible(manifest: dict[str, Any], embedder: Embedder, settings: dict) -> bool:
    """Whether an old generation's chunks and embeddings can be reused as they are."""
    return (
        manifest["embedder"].get("fingerprint") == embedder.fingerprint
        and manifest["chunking"] == settings
    )


def plan_write(
    name: str,
    old: Generation | None,
    pending: list[Pending],
    report: BuildReport,
    *,
    replace: bool,
    reuse: bool,
    config: RetrievalConfig,
    counter: TokenCounter,
    show_progress: bool,
) -> WritePlan:
    """Merge `pending` into `old` (replacing its document set when `replace`); fills the
    report's document lists. With `reuse` (old was built with this embedder and chunking),
    unchanged documents keep their chunks and already-embedded texts keep their rows."""
    from tqdm.auto import tqdm

    old_docs = {record["source"]: record for record in old.documents} if old else {}
    # Embeddings are a pure function of the embedded text: any chunk whose text was
    # embedded before (unchanged parts of an edited file, a renamed file) reuses it.
    known_rows: dict[str, int] = {}
    if old is not None and reuse:
        for row, chunk in enumerate(old.chunks):
            known_rows.setdefault(chunk.embedding_text(), row)

    final: dict[str, Pending | dict[str, Any]] = {}
    if old is not None and not replace:
        final.update(old_docs)
    for item in pending:
        final[item.source] = item

    chunks: list[Chunk] = []
    rows: list[int] = []
    documents: list[dict[str, Any]] = []
    for source, item in tqdm(
        list(final.items()), desc=f"chunk {name}", unit="doc", disable=not show_progress
    ):
        previous = old_docs.get(source)
        if isinstance(item, dict) or (
            reuse and previous is not None and previous["doc_hash"] == item.doc_hash
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
            doc_chunks = chunk_document(doc, config.chunk_tokens, config.chunk_overlap, counter)
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
    return WritePlan(documents, chunks, rows, changed=bool(changed or dropped))


def assemble_embeddings(
    chunks: list[Chunk],
    rows: list[int],
    old: Generation | None,
    embedder: Embedder,
    show_progress: bool,
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
        matrix[missing] = embedder.embed(texts, progress=show_progress)
    return matrix, int(missing.size)
