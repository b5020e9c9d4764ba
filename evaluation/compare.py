"""`ragtune bench --compare A B`: two runs side by side (two adapters, two models, two
settings), arm by arm and metric by metric.

Where both runs asked the same questions, B − A is a paired difference over the questions
both scored (bootstrap interval and sign-flip p-value from the rows in results.json);
otherwise only the two means are shown.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from evaluation import stats
from evaluation.scoring import METRIC_TITLES


def load_results(path: Path) -> dict[str, Any]:
    """A run directory (its results.json) or the file itself."""
    file = path / "results.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no results.json at {path}")
    return json.loads(file.read_text(encoding="utf-8"))


def _cell(estimate: dict[str, Any] | None) -> str:
    if not estimate or estimate.get("mean") is None:
        return "–"
    return f"{estimate['mean']:.3f} [{estimate['low']:.3f}, {estimate['high']:.3f}]"


def compare_runs(
    a: dict[str, Any], b: dict[str, Any], seed: int = 0, resamples: int = 2000
) -> list[dict[str, Any]]:
    """One entry per (arm in both runs, metric in either): the two estimates and, over
    the questions both scored, the paired B − A."""
    metrics = list(dict.fromkeys([*a["metrics"], *b["metrics"]]))
    out = []
    for arm in [name for name in a["arms"] if name in b["arms"]]:
        rows_a = {row["id"]: row for row in a["arms"][arm]["rows"]}
        rows_b = {row["id"]: row for row in b["arms"][arm]["rows"]}
        common = [i for i in rows_a if i in rows_b]
        for metric in metrics:
            test = stats.paired_test(
                [rows_a[i].get(metric) for i in common],
                [rows_b[i].get(metric) for i in common],
                seed,
                resamples,
            )
            out.append(
                {
                    "arm": arm,
                    "metric": metric,
                    "a": a["arms"][arm]["metrics"].get(metric),
                    "b": b["arms"][arm]["metrics"].get(metric),
                    **({"paired": test.to_dict()} if test.n else {"paired": None}),
                }
            )
    return out


def _run_line(label: str, path: Path, results: dict[str, Any]) -> str:
    run = results["run"]
    adapter = (run.get("adapter") or {}).get("name") or "–"
    models = sorted({arm["model"] for arm in results["arms"].values()})
    return (
        f"- **{label}** `{path}`: {run.get('dataset_name')}, {run.get('questions')} questions, "
        f"models {', '.join(models)}, adapter {adapter}, {run.get('duration_s')} s"
    )


def compare_markdown(path_a: Path, path_b: Path, seed: int = 0, resamples: int = 2000) -> str:
    a, b = load_results(path_a), load_results(path_b)
    entries = compare_runs(a, b, seed, resamples)
    lines = [
        "# Two benchmark runs side by side",
        "",
        _run_line("A", path_a, a),
        _run_line("B", path_b, b),
        "",
        "B − A is paired over the questions both runs scored (bootstrap 95% interval, "
        "sign-flip permutation p); * where the interval excludes zero.",
        "",
        "| arm | metric | A | B | B − A [95% CI] | p | n |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        d = e["paired"]
        if d is None or d["diff"] is None:
            diff, p, n = "–", "–", "0"
        else:
            star = " *" if d["low"] > 0 or d["high"] < 0 else ""
            diff = f"{d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]{star}"
            p, n = f"{d['p_value']:.4f}", str(d["n"])
        title = METRIC_TITLES.get(e["metric"], e["metric"])
        lines.append(
            f"| {e['arm']} | {title} | {_cell(e['a'])} | {_cell(e['b'])} | {diff} | {p} | {n} |"
        )
    only = sorted(set(a["arms"]) ^ set(b["arms"]))
    if only:
        lines += ["", f"Arms in one run only (not compared): {', '.join(only)}."]
    return "\n".join(lines) + "\n"
