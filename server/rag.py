"""Retrieval for requests: find sources, put them into the prompt through the one documented
template (retrieval.prompt), and return them as citations; plus the embedder behind
/v1/embeddings. Index and embedder calls block, so callers run them on worker threads."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ragtune.paths import PathNotAllowedError, confine, inside
from retrieval.config import RetrievalConfig
from retrieval.prompt import format_rag_prompt
from server.errors import BadRequestError, PermissionDeniedError
from server.protocol import RagOptions, Source

logger = logging.getLogger(__name__)


class RetrievalService:
    def __init__(self, config: RetrievalConfig, home: Path):
        from retrieval.embedder import Embedder
        from retrieval.store import IndexStore

        self.config = config
        self.embedder = Embedder(config.embedder, batch_size=config.batch_size)
        self.store = IndexStore.from_config(config, home=home, embedder=self.embedder)
        self.embedder_name = config.embedder_name
        self.source_roots = config.resolve_source_roots(home)
        self.source_roots[-1].mkdir(parents=True, exist_ok=True)  # <home>/documents

    def retrieve(
        self, options: RagOptions, question: str, adapter_index: str | None
    ) -> tuple[str, list[Source]]:
        """The prompt text carrying the numbered sources, and the sources to cite."""
        index = options.index or adapter_index or self.config.default_index
        if index is None:
            raise BadRequestError(
                "rag is true but no index is named: send rag.index, or set "
                "retrieval.default_index (or the adapter manifest's default_index)",
                "rag",
            )
        try:
            hits = self.store.get(index).search(
                question,
                top_k=options.top_k or self.config.default_top_k,
                mode=options.mode or self.config.default_mode,
                min_score=options.min_score,
            )
        except ValueError as exc:  # bad query/mode/top_k; InvalidIndexNameError is one too
            if type(exc).__name__ == "InvalidIndexNameError":
                raise BadRequestError(str(exc), "rag.index") from None
            raise BadRequestError(f"retrieval: {exc}", "rag") from None
        prompt = format_rag_prompt(
            question,
            hits,
            max_source_chars=self.config.max_source_chars,
            labels=self.config.source_labels,
        )
        sources = [
            Source(
                index=hit.index,
                source=hit.source,
                chunk_id=hit.chunk_id,
                score=round(float(hit.score), 6),
                text=hit.text,
                title=hit.title or None,
            )
            for hit in hits
        ]
        return prompt, sources

    def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        vectors = self.embedder.embed(texts)
        tokens = sum(self.embedder.count_tokens(texts))
        return vectors, tokens

    # -- index administration (admin scope; the routes audit every call) --------------------
    def list_indexes(self) -> list[dict[str, Any]]:
        """Each index's facts (server paths left out), or why it is unusable."""
        from retrieval.errors import IndexUnavailableError

        listed = []
        for entry in self.store.list_indexes():
            if isinstance(entry, IndexUnavailableError):
                listed.append({"status": "unavailable", "error": str(entry)})
            else:
                facts = entry.to_dict()
                facts.pop("path", None)
                listed.append({"status": "ready", **facts})
        return listed

    def write_index(self, name: str, sources: list[str], *, replace: bool) -> dict[str, Any]:
        """Build (replace=True) or add to an index from documents under the source roots."""
        paths = [str(self._confined_source(raw)) for raw in sources]
        if replace:
            report = self.store.build(name, paths, progress=False)
        else:
            report = self.store.add(name, paths, progress=False)
        return report.to_dict()

    def delete_index(self, name: str) -> None:
        self.store.delete(name)

    def _confined_source(self, raw: str) -> Path:
        """A document path inside the source roots, with nothing under it linking out."""
        try:
            path, root = confine(raw, self.source_roots, "document source")
        except PathNotAllowedError as exc:
            raise PermissionDeniedError(
                f"{exc}; add a directory to retrieval.source_roots", code="path_not_allowed"
            ) from None
        if not path.exists():
            raise BadRequestError(f"source not found: {raw!r}", "sources", code="not_found")
        from retrieval.loaders import iter_source_files

        for found in iter_source_files([path]):
            if not inside(found, root):
                raise PermissionDeniedError(
                    f"{found.name} under {raw!r} links outside the source root",
                    code="path_not_allowed",
                )
        return path
