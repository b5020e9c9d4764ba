"""Hybrid must beat both single modes on Japanese and identifier-heavy queries (shipped set)."""

from __future__ import annotations

import json

from retrieval.loaders import Document
from tests.retrieval.conftest import DATA


def _mrr(index, queries, mode: str) -> float:
    total = 0.0
    for query in queries:
        hits = index.search(query["query"], top_k=10, mode=mode)
        sources = [hit.source for hit in hits]
        if query["target"] in sources:
            total += 1.0 / (sources.index(query["target"]) + 1)
    return total / len(queries)


def test_hybrid_beats_dense_and_bm25_on_japanese_and_keyword_queries(store) -> None:
    data = json.loads((DATA / "ja_keyword_eval.json").read_text(encoding="utf-8"))
    docs = [Document.from_text(d["id"], d["text"], title=d["title"]) for d in data["documents"]]
    store.build_documents("jakw", docs, progress=False)
    index = store.get("jakw")
    queries = data["queries"]
    scores = {mode: _mrr(index, queries, mode) for mode in ("dense", "bm25", "hybrid")}
    assert scores["hybrid"] > scores["dense"], scores
    assert scores["hybrid"] > scores["bm25"], scores
