"""The verdict that opens a report: which arm wins on each metric (with its paired
interval against the runner-up), what each arm costs, and the reading the product's
documents give (RAG for knowledge that changes, fine-tuning for format, both when both
matter), each sentence of the reading stated only when a paired difference is clear: its
bootstrap interval excludes zero and its Holm-adjusted permutation p is below 0.05 (with a
handful of questions an interval can miss zero by chance; the p-value cannot).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evaluation.scoring import METRIC_TITLES

KNOWLEDGE = (
    "likelihood_accuracy",
    "likelihood_acc_norm",
    "keyword_hit",
    "reference_loglik_per_byte",
    "token_f1",
    "rouge_l",
    "exact_match",
    "label_accuracy",
)
FORMAT = ("decision_given",)
NOT_ARM_QUALITY = ("recall_at_k", "mrr", "groundedness")  # retrieval or RAG-only measures


def paired(results: dict[str, Any], metric: str, b: str, a: str) -> dict[str, Any] | None:
    """b − a on `metric` from the report's comparisons (either order), or None."""
    for c in results["comparisons"]:
        if c["metric"] != metric or c.get("diff") is None:
            continue
        if (c["a"], c["b"]) == (a, b):
            return {"diff": c["diff"], "low": c["low"], "high": c["high"], "p": c.get("p_holm")}
        if (c["a"], c["b"]) == (b, a):
            return {"diff": -c["diff"], "low": -c["high"], "high": -c["low"], "p": c.get("p_holm")}
    return None


def _mean(results: dict[str, Any], arm: str, metric: str) -> float | None:
    return (results["arms"][arm]["metrics"].get(metric) or {}).get("mean")


def _interval(d: dict[str, Any]) -> str:
    return f"{d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"


ALPHA = 0.05


def clear(d: dict[str, Any] | None) -> bool:
    """A paired difference above zero by its interval and by its (Holm) p-value."""
    return d is not None and d["low"] > 0 and (d["p"] is None or d["p"] < ALPHA)


def beats(results: dict[str, Any], metric: str, b: str, a: str) -> dict[str, Any] | None:
    """The paired difference when b is clearly better than a."""
    d = paired(results, metric, b, a)
    return d if clear(d) else None


def winners(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per metric: the arm with the best mean and how it compares with the runner-up."""
    out = []
    for metric in results["metrics"]:
        if metric in NOT_ARM_QUALITY:
            continue
        means = {a: _mean(results, a, metric) for a in results["arms"]}
        ranked = sorted((m, a) for a, m in means.items() if m is not None)[::-1]
        if len(ranked) < 2:
            continue
        (best_mean, best), (_, second) = ranked[0], ranked[1]
        d = paired(results, metric, best, second)
        out.append(
            {
                "metric": metric,
                "best": best,
                "mean": best_mean,
                "runner_up": second,
                "paired": d,
                "clear": clear(d),
                "all_equal": all(m == best_mean for m, _ in ranked),
            }
        )
    return out


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def costs(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per arm: training minutes and adapter size (ft arms), index size (rag arms), and the
    latency and prompt tokens it adds to an answer over the base arm."""
    run = results["run"]
    training = run.get("training") or {}
    adapter = run.get("adapter") or {}
    adapter_path = Path(adapter["path"]) if adapter.get("path") else None
    index = run.get("index_build") or run.get("index") or {}
    index_dir = Path(index["root"]) / index["name"] if index.get("root") else None
    arms = results["arms"]
    base = arms.get("base")
    rows = []
    for name, data in arms.items():
        ft, rag = name.startswith("ft"), bool(data.get("rag"))
        row: dict[str, Any] = {"arm": name}
        if ft:
            seconds = training.get("train_s") or (adapter.get("train") or {}).get("duration_s")
            row["train_min"] = None if seconds is None else round(seconds / 60, 1)
            size = _dir_bytes(adapter_path) if adapter_path else 0
            row["adapter_mb"] = round(size / 2**20, 1) if size else None
            peak = training.get("peak_rss_bytes")
            row["train_peak_gb"] = None if peak is None else round(peak / 2**30, 2)
        if rag and index_dir is not None:
            row["index_mb"] = round(_dir_bytes(index_dir) / 2**20, 1) or None
        if base is not None and name != "base":
            for key, field in (("latency_s", "p50"), ("prompt_tokens_mean", None)):
                mine = data[key][field] if field else data.get(key)
                theirs = base[key][field] if field else base.get(key)
                if mine is not None and theirs is not None:
                    row[f"added_{key}"] = round(mine - theirs, 2 if field else 1)
        rows.append(row)
    return rows


def reading(results: dict[str, Any]) -> list[str]:
    """The product's reading, one sentence per finding the intervals support."""
    arms = set(results["arms"])
    lines = []
    knowledge = [m for m in KNOWLEDGE if m in results["metrics"]]

    def first(b: str, a: str, metrics: list[str]) -> tuple[str, dict[str, Any]] | None:
        for metric in metrics:
            if {a, b} <= arms and (d := beats(results, metric, b, a)) is not None:
                return metric, d
        return None

    if found := first("rag", "base", knowledge):
        metric, d = found
        lines.append(
            f"Retrieval brings the documents' knowledge in: rag beats base on "
            f"{METRIC_TITLES[metric]} by {_interval(d)}. RAG is the tool for knowledge that "
            "changes: a new index changes the answers with no training."
        )
    ft_wins = [(m, d) for m in knowledge if (d := first("ft", "base", [m])) is not None]
    if ft_wins:
        metric = ft_wins[0][0]
        listed = "; on ".join(f"{METRIC_TITLES[m]} by {_interval(d)}" for m, (_, d) in ft_wins)
        sentence = f"Fine-tuning put some of it into the weights: ft beats base on {listed}"
        if (more := beats(results, metric, "rag", "ft")) is not None:
            sentence += (
                f"; less than retrieval on {METRIC_TITLES[metric]} (rag − ft {_interval(more)})"
            )
        lines.append(sentence + ".")
    for b, a in (("ft", "base"), ("ft+rag", "rag")):
        if found := first(b, a, [m for m in FORMAT if m in results["metrics"]]):
            metric, d = found
            lines.append(
                f"Fine-tuning sets the answer format: {b} beats {a} on "
                f"{METRIC_TITLES[metric]} by {_interval(d)}."
            )
    for metric in knowledge:
        both = [beats(results, metric, "ft+rag", other) for other in ("rag", "ft")]
        if {"ft+rag", "rag", "ft"} <= arms and all(both):
            lines.append(
                f"Both together beat either alone on {METRIC_TITLES[metric]} (ft+rag − rag "
                f"{_interval(both[0])}, ft+rag − ft {_interval(both[1])}): use both when "
                "both knowledge and format matter."
            )
            break
    if not lines:
        lines.append(
            "No paired difference is clear where the reading would need one: these numbers "
            "do not tell RAG and fine-tuning apart on this data."
        )
    return lines


def _num(value: Any, unit: str = "") -> str:
    return "–" if value is None else f"{value}{unit}"


def winner_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    for w in winners(results):
        title = METRIC_TITLES[w["metric"]]
        d = w["paired"]
        if w["all_equal"]:
            lines.append(f"- {title}: every arm {w['mean']:.3f}.")
        elif d is None:
            lines.append(f"- {title}: {w['best']} has the highest mean ({w['mean']:.3f}).")
        elif w["clear"]:
            lines.append(
                f"- {title}: **{w['best']}** wins ({w['mean']:.3f}); over the runner-up "
                f"{w['runner_up']} {_interval(d)}."
            )
        else:
            why = "the interval includes zero" if d["low"] <= 0 else f"Holm p {d['p']:.3f}"
            lines.append(
                f"- {title}: no clear winner: {w['best']} ({w['mean']:.3f}) vs "
                f"{w['runner_up']} {_interval(d)} ({why})."
            )
    return lines


def cost_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = [
        "arm",
        "training min",
        "adapter MB",
        "training peak RSS GB",
        "index MB",
        "added p50 latency s",
        "added prompt tokens / answer",
    ]
    rows = [
        [
            c["arm"],
            _num(c.get("train_min")),
            _num(c.get("adapter_mb")),
            _num(c.get("train_peak_gb")),
            _num(c.get("index_mb")),
            _num(c.get("added_latency_s")),
            _num(c.get("added_prompt_tokens_mean")),
        ]
        for c in costs(results)
    ]
    return header, rows


def verdict_markdown(results: dict[str, Any]) -> list[str]:
    """The report's opening section."""
    header, rows = cost_table(results)
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table += ["| " + " | ".join(row) + " |" for row in rows]
    return [
        "## Verdict",
        "",
        "Best arm per metric, with the paired difference to the runner-up (95% bootstrap "
        "interval on the same questions; a win needs the interval above zero and a "
        "Holm-adjusted permutation p below 0.05):",
        "",
        *winner_lines(results),
        "",
        "What each arm costs (added: over the base arm, per answer):",
        "",
        *table,
        "",
        "Reading (a sentence only where a paired difference is clear, as above):",
        "",
        *[f"- {line}" for line in reading(results)],
        "",
    ]
