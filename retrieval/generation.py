"""One index generation on disk: its file names, manifest, reading, writing and pruning.

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
Switching CURRENT and locking are the store's job (retrieval/store.py).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ragtune.fileio import atomic_write_text, sha256_file
from retrieval.chunking import Chunk
from retrieval.config import RetrievalConfig

if TYPE_CHECKING:
    from retrieval.embedder import Embedder

FORMAT_VERSION = 1
GENERATION_PATTERN = re.compile(r"^gen-(\d{6,})$")
CURRENT = "CURRENT"
MANIFEST = "manifest.json"
DOCUMENTS = "documents.json"
CHUNKS = "chunks.jsonl"
EMBEDDINGS = "embeddings.npy"
DENSE = "dense.faiss"
LEXICAL = "lexical"


@dataclass(frozen=True)
class IndexInfo:
    """Manifest-level facts about an index's current generation (no vectors loaded)."""

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
class Generation:
    """The raw contents of one generation, as read from disk for an update."""

    manifest: dict[str, Any]
    documents: list[dict[str, Any]]
    chunks: list[Chunk]
    embeddings: np.ndarray


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def read_generation(directory: Path, verify: bool = True) -> Generation:
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
    return Generation(manifest, documents, chunks, embeddings)


def info_from_manifest(name: str, directory: Path, manifest: dict[str, Any]) -> IndexInfo:
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


def write_generation(
    scratch: Path,
    *,
    name: str,
    generation: str,
    old: Generation | None,
    documents: list[dict[str, Any]],
    chunks: list[Chunk],
    embeddings: np.ndarray,
    embedder: Embedder,
    settings: dict[str, Any],
    config: RetrievalConfig,
    show_progress: bool,
) -> None:
    """Every file of a new generation into `scratch`, the manifest (with their checksums)
    last; `old` supplies the index's creation time."""
    from retrieval.dense import DenseIndex
    from retrieval.lexical import LexicalIndex

    (scratch / DOCUMENTS).write_text(json.dumps(documents, ensure_ascii=False), encoding="utf-8")
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
        [chunk.embedding_text() for chunk in chunks], progress=show_progress
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


def next_generation(directory: Path) -> str:
    numbers = [0]
    if directory.is_dir():
        for entry in directory.iterdir():
            match = GENERATION_PATTERN.fullmatch(entry.name)
            if match:
                numbers.append(int(match.group(1)))
    return f"gen-{max(numbers) + 1:06d}"


def prune(directory: Path, keep: set[str]) -> None:
    """Drop generations other than the current and previous one, and scratch left by a
    crashed writer: generation directories and CURRENT's temporary file (the caller holds
    the write lock, so no scratch is in use)."""
    for entry in directory.iterdir():
        if entry.name in keep or entry.name == CURRENT:
            continue
        if GENERATION_PATTERN.fullmatch(entry.name) or (
            entry.name.startswith(".gen-") and entry.is_dir()
        ):
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.name.startswith(f".{CURRENT}.") and entry.name.endswith(".tmp"):
            entry.unlink(missing_ok=True)
