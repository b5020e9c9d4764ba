"""One loaded, immutable index generation and its dense, BM25 and hybrid search."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.chunking import Chunk
from retrieval.config import SEARCH_MODES, RetrievalConfig
from retrieval.errors import IndexUnavailableError
from retrieval.generation import DENSE, LEXICAL, IndexInfo, info_from_manifest, read_generation

if TYPE_CHECKING:
    from retrieval.dense import DenseIndex
    from retrieval.embedder import Embedder
    from retrieval.lexical import LexicalIndex

MAX_TOP_K = 1000


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

        generation = read_generation(directory, verify=verify)
        manifest = generation.manifest
        if manifest["dense"]["kind"] == "hnsw":
            dense = DenseIndex.load(directory / DENSE, ef_search=config.hnsw_ef_search)
        else:
            flat_only = len(generation.chunks) + 1
            dense = DenseIndex.build(generation.embeddings, hnsw_threshold=flat_only)
        lexical = LexicalIndex.load(directory / LEXICAL)
        if dense.size != len(generation.chunks) or lexical.size != len(generation.chunks):
            raise ValueError("dense or lexical index size does not match the chunk count")
        info = info_from_manifest(name, directory, manifest)
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
