"""FAISS inner-product search over normalised embeddings (so scores are cosines).

Small indexes use exact `IndexFlatIP`; from `hnsw_threshold` chunks on, `IndexHNSWFlat`
keeps single-query latency flat as the index grows, at a small recall cost. Both are
read-only after construction, and FAISS allows concurrent searches on them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

FLAT = "flat"
HNSW = "hnsw"


class DenseIndex:
    def __init__(self, index: Any, kind: str) -> None:
        self._index = index
        self.kind = kind

    @property
    def size(self) -> int:
        return int(self._index.ntotal)

    @property
    def dim(self) -> int:
        return int(self._index.d)

    @classmethod
    def build(
        cls,
        embeddings: np.ndarray,
        *,
        hnsw_threshold: int,
        hnsw_m: int = 32,
        ef_construction: int = 80,
        ef_search: int = 96,
    ) -> DenseIndex:
        import faiss

        vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
        dim = vectors.shape[1]
        if len(vectors) >= hnsw_threshold:
            index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = ef_construction
            index.hnsw.efSearch = ef_search
            logger.info("building HNSW (M=%d) over %d vectors", hnsw_m, len(vectors))
            index.add(vectors)
            return cls(index, HNSW)
        index = faiss.IndexFlatIP(dim)
        index.add(vectors)
        return cls(index, FLAT)

    def save(self, path: Path) -> None:
        """Native FAISS serialisation (no pickle)."""
        import faiss

        faiss.write_index(self._index, str(path))

    @classmethod
    def load(cls, path: Path, *, ef_search: int) -> DenseIndex:
        import faiss

        index = faiss.read_index(str(path))
        if isinstance(index, faiss.IndexHNSWFlat):
            index.hnsw.efSearch = ef_search
            return cls(index, HNSW)
        if isinstance(index, faiss.IndexFlatIP):
            return cls(index, FLAT)
        raise ValueError(f"unexpected FAISS index type {type(index).__name__}")

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices, cosine scores) of the `k` nearest chunks, best first."""
        k = min(k, self.size)
        if k <= 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        scores, ids = self._index.search(query.reshape(1, -1).astype(np.float32, copy=False), k)
        keep = ids[0] >= 0
        return ids[0][keep].astype(np.int64), scores[0][keep]

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors for `ids` (to score candidates the ANN search did not return)."""
        if len(ids) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self._index.reconstruct_batch(np.asarray(ids, dtype=np.int64))
