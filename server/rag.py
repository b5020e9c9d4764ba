"""Retrieval for requests: find sources, put them into the prompt through the one documented
template (retrieval.prompt), and return them as citations; plus the embedder behind
/v1/embeddings. Index and embedder calls block, so callers run them on worker threads."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from retrieval.config import RetrievalConfig
from retrieval.prompt import format_rag_prompt
from server.errors import BadRequestError
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
        prompt = format_rag_prompt(question, hits, max_source_chars=self.config.max_source_chars)
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
