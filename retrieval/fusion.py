"""Combine dense and BM25 results into one ranking.

Default: z-score fusion. Each candidate (the union of the dense and BM25 top lists) has
its exact cosine and BM25 score; each score list is standardised over the candidates
(z = (s - mean) / std) and mixed as ``w * z_dense + (1 - w) * z_bm25`` with w = 0.7.

Why not plain reciprocal-rank fusion: RRF gives every retriever's first place the same
credit, however narrowly it won. A z-score says how far a candidate stands out from the
rest of the pool: one rare bigram or identifier (``ERR-4471``) that only one chunk
contains gives that chunk a BM25 z far above anything the dense side assigns to
near-equal cosines, and a clearly closest embedding likewise beats a crowd of similar
BM25 scores. Ranks keep neither margin.

Measured (docs/retrieval.md): equal-weight RRF fell below BM25 on the Japanese/keyword
set, while z-score fusion beat both single modes there and on PubMedQA; dense weights from
0.65 to 0.8 gave the same picture, and 0.7 sits in the middle of that plateau.
"""

from __future__ import annotations

import numpy as np

DENSE_WEIGHT = 0.7
RRF_K = 60.0
FUSION_METHODS = ("zscore", "rrf")


def zscores(scores: np.ndarray) -> np.ndarray:
    """(s - mean) / std; all zeros when the scores do not discriminate (std 0)."""
    scores = np.asarray(scores, dtype=np.float64)
    std = scores.std()
    if scores.size == 0 or std <= 1e-12:
        return np.zeros_like(scores)
    return (scores - scores.mean()) / std


def zscore_fusion(
    dense: np.ndarray, lexical: np.ndarray, dense_weight: float = DENSE_WEIGHT
) -> np.ndarray:
    return dense_weight * zscores(dense) + (1.0 - dense_weight) * zscores(lexical)


def _ranks(scores: np.ndarray) -> np.ndarray:
    order = np.argsort(-scores, kind="stable")
    ranks = np.empty(len(scores), dtype=np.float64)
    ranks[order] = np.arange(1, len(scores) + 1)
    return ranks


def rrf_fusion(
    dense: np.ndarray, lexical: np.ndarray, dense_weight: float = 0.5, k: float = RRF_K
) -> np.ndarray:
    """Weighted reciprocal-rank fusion over the candidates; BM25 non-matches get no share.
    Weights are normalised so that 0.5 is classic equal-weight RRF."""
    fused = 2.0 * dense_weight / (k + _ranks(dense))
    matched = lexical > 0
    fused[matched] += 2.0 * (1.0 - dense_weight) / (k + _ranks(lexical)[matched])
    return fused


def fuse(
    dense: np.ndarray,
    lexical: np.ndarray,
    method: str = "zscore",
    dense_weight: float = DENSE_WEIGHT,
) -> np.ndarray:
    """Fused score per candidate (higher is better) from its dense cosine and BM25 score."""
    if len(dense) != len(lexical):
        raise ValueError("dense and lexical scores must cover the same candidates")
    if method == "zscore":
        return zscore_fusion(dense, lexical, dense_weight)
    if method == "rrf":
        return rrf_fusion(dense, lexical, dense_weight)
    raise ValueError(f"unknown fusion method {method!r}; use one of {FUSION_METHODS}")
