"""Per-question scores for every arm, and per-arm summaries with intervals and paired tests.

Quality metrics are means over questions with bootstrap 95% intervals; arms are compared on
the same questions (paired), with Holm-adjusted p-values over the arm pairs of each metric.
Failed requests score as empty answers (zero), never dropped: dropping them would flatter
an arm that fails on hard questions.
"""

from __future__ import annotations

from collections import Counter
from itertools import combinations
from typing import Any

from evaluation import metrics, stats
from evaluation.dataset import QAItem
from evaluation.labels import parse_label

QUALITY_METRICS = (
    "likelihood_accuracy",
    "likelihood_acc_norm",
    "likelihood_acc_bytes",
    "reference_loglik_per_byte",
    "label_accuracy",
    "decision_given",
    "keyword_hit",
    "exact_match",
    "token_f1",
    "rouge_l",
    "recall_at_k",
    "mrr",
    "groundedness",
)
METRIC_TITLES = {
    "likelihood_accuracy": "acc (likelihood)",
    "likelihood_acc_norm": "acc_norm (likelihood)",
    "likelihood_acc_bytes": "acc_bytes (likelihood)",
    "reference_loglik_per_byte": "reference log-lik / byte",
    "label_accuracy": "label accuracy",
    "decision_given": "decision given",
    "keyword_hit": "keyword hit",
    "exact_match": "exact match",
    "token_f1": "token F1",
    "rouge_l": "ROUGE-L",
    "recall_at_k": "recall@k",
    "mrr": "MRR",
    "groundedness": "groundedness",
    "completion_tokens": "tokens / answer",
}


def score_row(
    item: QAItem, row: dict[str, Any], labels: tuple[str, ...], top_k: int
) -> dict[str, Any]:
    """The metrics of one answer; None where a metric does not apply."""
    answer = row.get("answer") or ""
    references = list(item.answers) or ([item.label] if item.label else [])
    retrieved = row.get("sources") or []
    source_ids = [s["source"] for s in retrieved]
    rag = bool(row.get("rag"))
    predicted = parse_label(answer, item.question, labels) if item.label else None
    return {
        "predicted_label": predicted,
        "label_accuracy": (float(predicted == item.label) if item.label else None),
        "decision_given": (float(predicted is not None) if item.label else None),
        "keyword_hit": metrics.keyword_hit(answer, item.keywords),
        "exact_match": metrics.exact_match(answer, references),
        "token_f1": metrics.token_f1(answer, references),
        "rouge_l": metrics.rouge_l(answer, references),
        "recall_at_k": metrics.recall_at_k(source_ids, item.gold_doc_ids, top_k) if rag else None,
        "mrr": metrics.reciprocal_rank(source_ids, item.gold_doc_ids) if rag else None,
        "groundedness": (
            metrics.groundedness(answer, [s.get("text") or "" for s in retrieved]) if rag else None
        ),
    }


def _available(scored: dict[str, list[dict[str, Any]]], metric: str) -> bool:
    present = any(row.get(metric) is not None for rows in scored.values() for row in rows)
    if metric == "likelihood_acc_bytes":  # shown only where it differs from acc_norm
        return present and any(
            row.get(metric) != row.get("likelihood_acc_norm")
            for rows in scored.values()
            for row in rows
        )
    return present


def summarise(
    items: list[QAItem],
    rows_by_arm: dict[str, list[dict[str, Any]]],
    *,
    labels: tuple[str, ...],
    top_k: int,
    seed: int,
    resamples: int = stats.DEFAULT_RESAMPLES,
) -> dict[str, Any]:
    """Score every row in place and return {"metrics", "arms", "comparisons", "labels"}."""
    by_id = {item.id: item for item in items}
    for rows in rows_by_arm.values():
        for row in rows:
            row.update(score_row(by_id[row["id"]], row, labels, top_k))
    present = [m for m in QUALITY_METRICS if _available(rows_by_arm, m)]
    arms: dict[str, Any] = {}
    for arm, rows in rows_by_arm.items():
        latencies = [row["latency_s"] for row in rows]
        tokens = [row["completion_tokens"] for row in rows]
        summary: dict[str, Any] = {
            "questions": len(rows),
            "errors": sum(bool(row.get("error")) for row in rows),
            "metrics": {
                metric: stats.bootstrap_ci(
                    [row.get(metric) for row in rows], seed, resamples
                ).to_dict()
                for metric in present
            },
            "completion_tokens": stats.bootstrap_ci(tokens, seed, resamples).to_dict(),
            "latency_s": {
                "p50": _round(stats.percentile(latencies, 50)),
                "p95": _round(stats.percentile(latencies, 95)),
                "mean": _round(stats.mean(latencies)),
            },
            "finish_length": sum(row.get("finish_reason") == "length" for row in rows),
            "prompt_tokens_mean": _round(stats.mean([row.get("prompt_tokens") for row in rows])),
        }
        if any(item.label for item in items):
            counts = Counter(str(row["predicted_label"]) for row in rows)
            summary["predicted_labels"] = dict(sorted(counts.items()))
        arms[arm] = summary
    gold = Counter(item.label for item in items if item.label)
    majority = None
    if gold:
        label, count = max(sorted(gold.items()), key=lambda pair: pair[1])
        majority = {"label": label, "accuracy": round(count / sum(gold.values()), 6)}
    return {
        "metrics": present,
        "arms": arms,
        "comparisons": compare(rows_by_arm, present, seed, resamples),
        "gold_labels": dict(sorted(gold.items())),
        "majority_baseline": majority,
    }


def compare(
    rows_by_arm: dict[str, list[dict[str, Any]]],
    present: list[str],
    seed: int,
    resamples: int = stats.DEFAULT_RESAMPLES,
) -> list[dict[str, Any]]:
    """Every pair of arms (later minus earlier, in --arms order) on every metric."""
    results: list[dict[str, Any]] = []
    names = list(rows_by_arm)
    for metric in present:
        block = []
        for a, b in combinations(names, 2):
            scores_a = {row["id"]: row.get(metric) for row in rows_by_arm[a]}
            scores_b = {row["id"]: row.get(metric) for row in rows_by_arm[b]}
            ids = [i for i in scores_a if i in scores_b]
            test = stats.paired_test(
                [scores_a[i] for i in ids], [scores_b[i] for i in ids], seed, resamples
            )
            if test.n:
                block.append({"metric": metric, "a": a, "b": b, **test.to_dict()})
        for entry, adjusted in zip(block, stats.holm([e["p_value"] for e in block]), strict=True):
            entry["p_holm"] = _round(adjusted)
        results.extend(block)
    return results


def _round(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(value, digits)
