"""The Markdown view of a benchmark's results (report.py): summary and comparison tables,
the verdict, how the likelihood arms and the preset ran, and a few examples."""

from __future__ import annotations

from typing import Any

from evaluation.scoring import METRIC_TITLES
from evaluation.verdict import verdict_markdown


def estimate_cell(estimate: dict[str, Any] | None) -> str:
    if not estimate or estimate.get("mean") is None:
        return "–"
    return f"{estimate['mean']:.3f} [{estimate['low']:.3f}, {estimate['high']:.3f}]"


def number(value: float | None, fmt: str = ".2f") -> str:
    return "–" if value is None else format(value, fmt)


Table = tuple[list[str], list[list[str]]]


def markdown_table(table: Table) -> list[str]:
    header, rows = table
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def summary_table(results: dict[str, Any]) -> Table:
    metrics = results["metrics"]
    header = ["arm", "model", *[METRIC_TITLES[m] for m in metrics]]
    header += ["tokens/answer", "p50 s", "p95 s", "errors"]
    rows = []
    for arm, data in results["arms"].items():
        model = data["model"] + (" + rag" if data["rag"] else "")
        cells = [arm, model, *[estimate_cell(data["metrics"].get(m)) for m in metrics]]
        cells += [
            number(data["completion_tokens"]["mean"], ".1f"),
            number(data["latency_s"]["p50"]),
            number(data["latency_s"]["p95"]),
            str(data["errors"]),
        ]
        rows.append(cells)
    return header, rows


def comparison_table(results: dict[str, Any]) -> Table:
    header = ["metric", "B − A", "difference [95% CI]", "p (permutation)", "p (Holm)", "n"]
    rows = []
    for c in results["comparisons"]:
        star = " *" if c["p_holm"] is not None and c["p_holm"] < 0.05 else ""
        rows.append(
            [
                METRIC_TITLES[c["metric"]],
                f"{c['b']} − {c['a']}",
                f"{c['diff']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]",
                f"{c['p_value']:.4f}",
                f"{c['p_holm']:.4f}{star}",
                str(c["n"]),
            ]
        )
    return header, rows


def markdown_report(results: dict[str, Any]) -> str:
    run = results["run"]
    settings = run["settings"]
    lines = [
        f"# Benchmark: {run['dataset_name']}",
        "",
        f"{run['questions']} questions from `{run['dataset']}`; arms "
        f"{', '.join(results['arms'])}; greedy decoding (temperature {settings['temperature']}),"
        f" max_tokens {settings['max_tokens']}, seed {run['seed']}, top_k {settings['top_k']}"
        f" (index `{settings['index']}`), {settings['concurrency']} requests in flight. "
        f"Run took {run['duration_s']:.0f} s on {run['server']}.",
        "",
        *verdict_markdown(results),
        "## Summary",
        "",
        "Means with percentile-bootstrap 95% intervals "
        f"({run['resamples']} resamples, seed {run['seed']}). Latency is per request, measured "
        "by the client under the run's concurrency.",
        "",
        *markdown_table(summary_table(results)),
        "",
    ]
    if run.get("likelihood"):
        lines += [likelihood_line(run["likelihood"]), ""]
    if run.get("preset"):
        lines += [preset_line(run), ""]
    majority = results.get("majority_baseline")
    if results["gold_labels"] and majority:
        lines += [
            "Gold labels: "
            + ", ".join(f"{k} {v}" for k, v in results["gold_labels"].items())
            + f". Always answering the most common label ({majority['label']}) scores "
            f"{majority['accuracy']:.3f} label accuracy: the bar an arm must clear. "
            "Predicted labels per arm (None: no yes/no/maybe cue found):",
            "",
        ]
        lines += [
            f"- {arm}: " + ", ".join(f"{k} {v}" for k, v in data["predicted_labels"].items())
            for arm, data in results["arms"].items()
        ]
        lines.append("")
    if results["comparisons"]:
        lines += [
            "## Paired comparisons",
            "",
            "Same questions in both arms; difference of means B − A with a paired bootstrap "
            "interval, two-sided sign-flip permutation p-value, Holm-adjusted over the arm "
            "pairs of each metric (* below 0.05).",
            "",
            *markdown_table(comparison_table(results)),
            "",
        ]
    lines += ["## Per-question answers (first 10)", ""]
    lines += _markdown_examples(results, 10)
    return "\n".join(lines) + "\n"


def likelihood_line(facts: dict[str, Any]) -> str:
    """How the likelihood columns were made, and whether every prompt was the arm's own."""
    arms = facts.get("arms") or {}
    mismatches = sum(a.get("prompt_mismatches") or 0 for a in arms.values())
    errors = sum(a.get("errors") or 0 for a in arms.values())
    settled = sum(a.get("settled_by_echo") or 0 for a in arms.values())
    reused = settled + sum(a.get("from_generation") or 0 for a in arms.values())
    scored = sum(a.get("questions") or 0 for a in arms.values())
    line = (
        "Likelihood columns: each answer choice (free-text questions: the first reference "
        "answer) scored by its log-likelihood after the arm's own prompt (the server's echo "
        "logprobs, as lm-evaluation-harness scores multiple_choice: acc picks the highest "
        "sum, acc_norm the highest per character; reference log-lik / byte is the sum per "
        "UTF-8 byte of the reference) in "
        f"{facts.get('seconds')} s; {errors} failed, {mismatches} rebuilt prompts differed "
        "in length from the generation request's."
    )
    if reused:
        line += (
            f" {reused} of {scored} questions were read from the generation request's own "
            f"prompt and first-token logprobs (`--likelihood-from generation`; {settled} of "
            "them with a choice outside its top alternatives echoed to settle the pick), "
            f"{scored - reused} echoed."
        )
    echoed = [a["echoed_prompts"] for a in arms.values() if a.get("echoed_prompts") is not None]
    if echoed:
        line += (
            f" The server prefilled {sum(echoed)} prompts for it (one per question where the "
            "other choices were among the echoed choice's top alternatives)."
        )
    return line


def preset_line(run: dict[str, Any]) -> str:
    """Where the preset's time went: index build, adapter training, generation, total."""
    index = run.get("index_build") or {}
    parts = [
        f"Preset `{run['preset']}`: index of {index.get('documents')} documents "
        f"({index.get('chunks')} chunks) built in {index.get('build_seconds')} s"
    ]
    training = run.get("training")
    if training:
        if training.get("reused"):
            parts.append("knowledge adapter reused from an earlier run with the same data")
        else:
            parts.append(
                f"knowledge adapter trained on {training['examples']} examples from "
                f"{training['documents']} documents ({training.get('format_examples')} of them "
                f"format-keeping, {training.get('format_recipe')}) for "
                f"{training.get('global_step')} steps ({training.get('examples_seen')} examples "
                f"seen, train loss {training.get('train_loss')}) in {training.get('train_s')} s"
            )
    parts.append(f"generation {run.get('generation_s')} s")
    if run.get("likelihood"):
        parts.append(f"likelihood scoring {run['likelihood'].get('seconds')} s")
    if run.get("preset_total_s") is not None:
        parts.append(f"total {run['preset_total_s']} s")
    return "; ".join(parts) + "."


def _markdown_examples(results: dict[str, Any], limit: int) -> list[str]:
    arms = list(results["arms"])
    first = results["arms"][arms[0]]["rows"]
    lines: list[str] = []
    for index, row in enumerate(first[:limit]):
        gold = row.get("gold_label") or "; ".join(row.get("gold_answers") or [])[:200]
        lines += [f"**{row['id']}**: {row['question']} (gold: {gold})", ""]
        for arm in arms:
            other = results["arms"][arm]["rows"][index]
            answer = " ".join((other.get("answer") or other.get("error") or "").split())
            label = f" [{other.get('predicted_label')}]" if row.get("gold_label") else ""
            if other.get("likelihood_choice") is not None:
                label += f" [likelihood: {other['likelihood_choice']}]"
            lines.append(f"- {arm}{label}: {answer[:300]}")
        lines.append("")
    return lines


# ---------------------------------------------------------------------------------- HTML
