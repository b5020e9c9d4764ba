"""The promotion gate: is a candidate adapter version at least as good as the active one?

Both versions answer the same questions on the same server as the bench's `ft` arm
(`model=name@version`, the same prompts, greedy, seed), each a full `ragtune bench` run with
its own report; the two runs are then compared as `ragtune bench --compare` does: paired over
the questions, candidate − active with a bootstrap interval. The candidate passes when the
lower end of that 95 % interval is at least −min_delta: the data rule out it being worse
than the active version by more than min_delta (a non-inferiority test, in the metric's own
units). No second evaluator: this module only chooses the metric and applies the rule.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evaluation import stats

logger = logging.getLogger(__name__)

# `--metric auto`: the first of these the dataset yields (knowledge measures first)
AUTO_METRICS = (
    "likelihood_accuracy",
    "reference_loglik_per_byte",
    "label_accuracy",
    "keyword_hit",
    "token_f1",
)


@dataclass
class GateOptions:
    url: str  # the server's /v1 URL; both versions must be loaded there
    api_key: str
    adapter: str
    active: str  # version now active
    candidate: str  # version to promote
    dataset: Path
    out: Path
    metric: str = "auto"
    min_delta: float = 0.0
    limit: int | None = None
    seed: int = 0
    max_tokens: int = 32
    concurrency: int = 8
    resamples: int = stats.DEFAULT_RESAMPLES
    progress: bool = True


def choose_metric(requested: str, available: list[str]) -> str:
    """The metric to judge on; ValueError naming the ones there are if it is missing."""
    if requested == "auto":
        found = next((m for m in AUTO_METRICS if m in available), None)
        if found is None:
            raise ValueError(f"no metric to gate on; this dataset yields {', '.join(available)}")
        return found
    if requested not in available:
        raise ValueError(
            f"--metric {requested} is not measured on this dataset; choose one of "
            f"{', '.join(available)}"
        )
    return requested


def decide(paired: dict[str, Any] | None, min_delta: float) -> bool:
    """Accept when the interval's lower end of candidate − active is ≥ −min_delta."""
    return bool(paired and paired.get("low") is not None and paired["low"] >= -min_delta)


def run_gate(options: GateOptions) -> dict[str, Any]:
    """Bench both versions, compare them and decide; returns the numbers and the decision
    (what goes into the audit log and the manifest)."""
    from evaluation.bench import BenchOptions, run_bench
    from evaluation.compare import compare_runs

    runs = {}
    for role, version in (("active", options.active), ("candidate", options.candidate)):
        logger.info("gate: %s %s@%s", role, options.adapter, version)
        runs[role] = run_bench(
            BenchOptions(
                dataset=options.dataset,
                out=options.out / role,
                arms="ft",
                adapter=f"{options.adapter}@{version}",
                url=options.url,
                api_key=options.api_key,
                limit=options.limit,
                seed=options.seed,
                max_tokens=options.max_tokens,
                concurrency=options.concurrency,
                resamples=options.resamples,
                progress=options.progress,
                name=f"gate {options.adapter}@{version}",
            )
        )
    entries = compare_runs(runs["active"], runs["candidate"], options.seed, options.resamples)
    by_metric = {e["metric"]: e for e in entries if e["arm"] == "ft"}
    metric = choose_metric(options.metric, list(by_metric))
    entry = by_metric[metric]
    paired = entry["paired"]
    accepted = decide(paired, options.min_delta)
    errors = {role: run["arms"]["ft"]["errors"] for role, run in runs.items()}
    return {
        "accepted": accepted,
        "metric": metric,
        "min_delta": options.min_delta,
        "rule": "accept when the 95% paired bootstrap interval of candidate - active "
        "has its lower end >= -min_delta",
        "active_version": options.active,
        "candidate_version": options.candidate,
        "dataset": str(options.dataset),
        "questions": runs["active"]["run"]["questions"],
        "active": entry["a"],
        "candidate": entry["b"],
        "paired": paired,
        "errors": errors,
        "out": str(options.out),
    }
