"""Retrieval benchmark: recall@1/5/10 and MRR per search mode, build throughput, and search
latency on a synthetic 100k-chunk index. Prints one JSON object.

    python bench/retrieval_eval.py                      # everything (several minutes on CPU)
    python bench/retrieval_eval.py --skip-latency       # quality only
    python bench/retrieval_eval.py --pubmedqa PATH      # another copy of pqal_dev.jsonl

Quality sets:
  * PubMedQA (pqal_dev.jsonl, 500 items): each question must retrieve its own abstract
    among all 500 abstracts (document-level: chunk hits are collapsed to their abstract).
  * tests/retrieval/data/ja_keyword_eval.json: Japanese and identifier-heavy queries over a
    small internal-knowledge corpus with near-duplicate distractors.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DEFAULT_PUBMEDQA = Path("/work/shared/data/pubmedqa/pqal_dev.jsonl")
JA_KEYWORD_SET = REPO / "tests" / "retrieval" / "data" / "ja_keyword_eval.json"
MODES = ("dense", "bm25", "hybrid", "hybrid_rrf")


def doc_metrics(ranked_sources: list[list[str]], targets: list[str]) -> dict[str, float]:
    """recall@1/5/10 and MRR (over the first 10 distinct documents)."""
    r1 = r5 = r10 = mrr = 0.0
    for sources, target in zip(ranked_sources, targets, strict=True):
        if target in sources[:10]:
            position = sources.index(target) + 1
            r1 += position <= 1
            r5 += position <= 5
            r10 += position <= 10
            mrr += 1.0 / position
    n = len(targets)
    return {
        "recall@1": round(r1 / n, 4),
        "recall@5": round(r5 / n, 4),
        "recall@10": round(r10 / n, 4),
        "mrr": round(mrr / n, 4),
    }


def distinct_sources(hits: list[Any], limit: int = 10) -> list[str]:
    seen: list[str] = []
    for hit in hits:
        if hit.source not in seen:
            seen.append(hit.source)
        if len(seen) == limit:
            break
    return seen


def evaluate(store: Any, rrf_store: Any, name: str, queries: list[dict[str, str]]) -> dict:
    """Metrics for each mode; `hybrid_rrf` is equal-weight RRF over the same candidates."""
    results: dict[str, Any] = {}
    for mode in MODES:
        index = (rrf_store if mode == "hybrid_rrf" else store).get(name)
        search_mode = "hybrid" if mode == "hybrid_rrf" else mode
        ranked = [
            distinct_sources(index.search(q["query"], top_k=40, mode=search_mode)) for q in queries
        ]
        results[mode] = doc_metrics(ranked, [q["target"] for q in queries])
    return results


def run_quality(args: argparse.Namespace, work: Path, embedder: Any) -> dict[str, Any]:
    from retrieval.config import RetrievalConfig
    from retrieval.loaders import Document
    from retrieval.store import IndexStore

    config = RetrievalConfig(root=work / "indexes")
    store = IndexStore(config.root, config=config, embedder=embedder)
    rrf_config = config.model_copy(update={"fusion": "rrf", "dense_weight": 0.5})
    rrf_store = IndexStore(config.root, config=rrf_config, embedder=embedder)
    out: dict[str, Any] = {}

    if not args.skip_pubmedqa:
        with open(args.pubmedqa, encoding="utf-8") as handle:  # not splitlines(): U+2028 inside
            rows = [json.loads(line) for line in handle if line.strip()]
        rows = rows[: args.limit] if args.limit else rows
        docs = [
            Document.from_text(f"pubmedqa:{row['id']}", "\n\n".join(row["contexts"]))
            for row in rows
        ]
        report = store.build_documents("pubmedqa", docs, progress=args.progress)
        queries = [{"query": row["question"], "target": f"pubmedqa:{row['id']}"} for row in rows]
        out["pubmedqa"] = {
            "documents": report.documents,
            "chunks": report.chunks,
            "build_seconds": round(report.seconds, 2),
            "build_chunks_per_s": round(report.chunks_per_second, 2),
            "modes": evaluate(store, rrf_store, "pubmedqa", queries),
        }

    data = json.loads(JA_KEYWORD_SET.read_text(encoding="utf-8"))
    docs = [Document.from_text(d["id"], d["text"], title=d["title"]) for d in data["documents"]]
    store.build_documents("ja_keyword", docs, progress=False)
    section: dict[str, Any] = {"documents": len(docs), "queries": len(data["queries"])}
    section["all"] = evaluate(store, rrf_store, "ja_keyword", data["queries"])
    for kind in sorted({q["type"] for q in data["queries"]}):
        subset = [q for q in data["queries"] if q["type"] == kind]
        section[kind] = evaluate(store, rrf_store, "ja_keyword", subset)
    out["ja_keyword"] = section
    return out


def _synthetic_corpus(n: int, rng: np.random.Generator) -> list[str]:
    vocabulary = np.array([f"w{i:x}" for i in range(30_000)])
    weights = 1.0 / np.arange(1, len(vocabulary) + 1) ** 1.05
    weights /= weights.sum()
    lengths = rng.integers(40, 120, size=n)
    words = rng.choice(len(vocabulary), size=int(lengths.sum()), p=weights)
    texts, offset = [], 0
    for length in lengths:
        texts.append(" ".join(vocabulary[words[offset : offset + length]]))
        offset += length
    return texts


def _percentiles(samples: list[float]) -> dict[str, float]:
    values = np.asarray(samples) * 1000.0
    return {
        "p50_ms": round(float(np.percentile(values, 50)), 3),
        "p95_ms": round(float(np.percentile(values, 95)), 3),
    }


def run_latency(args: argparse.Namespace, embedder: Any) -> dict[str, Any]:
    """Search latency on a synthetic index: random unit vectors + Zipfian pseudo-word texts.
    `index_only` excludes the query embedding; `end_to_end` is Index.search as the server
    calls it (query embedding with the real MiniLM included)."""
    from retrieval.chunking import Chunk
    from retrieval.config import RetrievalConfig
    from retrieval.dense import DenseIndex
    from retrieval.generation import IndexInfo
    from retrieval.index import Index
    from retrieval.lexical import LexicalIndex, top_k_positive

    rng = np.random.default_rng(0)
    n, dim = args.synthetic_chunks, embedder.dim
    config = RetrievalConfig()
    vectors = rng.standard_normal((n, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    texts = _synthetic_corpus(n, rng)

    started = time.perf_counter()
    lexical = LexicalIndex.build(texts, progress=args.progress)
    lexical_build = time.perf_counter() - started
    chunks = [
        Chunk(f"c{i}", f"doc{i // 4}", "", (), 0, len(text), "0", text)
        for i, text in enumerate(texts)
    ]

    query_ids = rng.choice(n, size=args.queries, replace=False)
    noise = rng.standard_normal((args.queries, dim), dtype=np.float32) * 0.03
    query_vectors = vectors[query_ids] + noise
    query_vectors /= np.linalg.norm(query_vectors, axis=1, keepdims=True)
    query_texts = [" ".join(texts[i].split()[5:9]) for i in query_ids]

    out: dict[str, Any] = {
        "chunks": n,
        "dim": dim,
        "queries": args.queries,
        "lexical_build_s": round(lexical_build, 2),
    }
    flat = DenseIndex.build(vectors, hnsw_threshold=n + 1)
    for kind in ("flat", "hnsw"):
        started = time.perf_counter()
        if kind == "hnsw":
            dense = DenseIndex.build(
                vectors,
                hnsw_threshold=0,
                hnsw_m=config.hnsw_m,
                ef_construction=config.hnsw_ef_construction,
                ef_search=config.hnsw_ef_search,
            )
        else:
            dense = flat
        build_s = time.perf_counter() - started
        described = embedder.describe()
        info = IndexInfo("synthetic", "", "gen-000001", n // 4, n, kind, described, {}, "", "", 0)
        index = Index("synthetic", info, chunks, dense, lexical, lambda: embedder, config)
        timings: dict[str, list[float]] = {
            "dense": [],
            "bm25": [],
            "hybrid": [],
            "dense_e2e": [],
            "bm25_e2e": [],
            "hybrid_e2e": [],
        }
        recall_hits = 0
        for qv, qt in zip(query_vectors, query_texts, strict=True):
            t0 = time.perf_counter()
            ids, _ = dense.search(qv, 10)
            timings["dense"].append(time.perf_counter() - t0)
            exact, _ = flat.search(qv, 10)
            recall_hits += len(set(ids.tolist()) & set(exact.tolist()))
            t0 = time.perf_counter()
            top_k_positive(lexical.scores(qt), 10)
            timings["bm25"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            index._hybrid(qt, qv, 10)
            timings["hybrid"].append(time.perf_counter() - t0)
            for mode in ("dense", "bm25", "hybrid"):
                t0 = time.perf_counter()
                index.search(qt, top_k=10, mode=mode)
                timings[f"{mode}_e2e"].append(time.perf_counter() - t0)
        out[kind] = {
            "build_s": round(build_s, 2),
            "recall@10_vs_exact": round(recall_hits / (10 * args.queries), 4),
            "index_only": {m: _percentiles(timings[m]) for m in ("dense", "bm25", "hybrid")},
            "end_to_end": {
                m: _percentiles(timings[f"{m}_e2e"]) for m in ("dense", "bm25", "hybrid")
            },
        }
    started = time.perf_counter()
    for text in query_texts[:50]:
        embedder.embed([text])
    out["query_embedding_ms"] = round((time.perf_counter() - started) / 50 * 1000, 3)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pubmedqa", type=Path, default=DEFAULT_PUBMEDQA)
    parser.add_argument("--limit", type=int, default=0, help="use only the first N questions")
    parser.add_argument("--skip-pubmedqa", action="store_true")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--synthetic-chunks", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200, help="latency queries")
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a temp dir")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    parser.add_argument(
        "--torch-threads", type=int, default=0, help="torch intra-op threads (0: torch default)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import torch

    from retrieval.embedder import Embedder

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    embedder = Embedder("bundled")
    result: dict[str, Any] = {
        "embedder": embedder.describe(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    with tempfile.TemporaryDirectory(prefix="ragtune-bench-") as tmp:
        work = args.work_dir or Path(tmp)
        result["quality"] = run_quality(args, work, embedder)
        if not args.skip_latency:
            result["latency"] = run_latency(args, embedder)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
