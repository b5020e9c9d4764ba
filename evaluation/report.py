"""Write a benchmark's results: results.json (everything), report.md and report.html.

results.json is the record: the run's settings, per arm every metric with its interval and
every per-question row, and the paired comparisons. The Markdown and HTML reports are views
of it; the HTML one is self-contained (inline CSS and SVG, no scripts or external assets)
and carries the per-question rows for error analysis.
"""

from __future__ import annotations

import json
import logging
from html import escape
from pathlib import Path
from typing import Any

from evaluation.plots import bar_panel, latency_strip
from evaluation.scoring import METRIC_TITLES
from evaluation.verdict import cost_table, reading, verdict_markdown, winner_lines
from ragtune.fileio import atomic_write_text

logger = logging.getLogger(__name__)

SNIPPET_CHARS = 300


def _cell(estimate: dict[str, Any] | None) -> str:
    if not estimate or estimate.get("mean") is None:
        return "–"
    return f"{estimate['mean']:.3f} [{estimate['low']:.3f}, {estimate['high']:.3f}]"


def _num(value: float | None, fmt: str = ".2f") -> str:
    return "–" if value is None else format(value, fmt)


def public_row(row: dict[str, Any], question: str, gold: dict[str, Any]) -> dict[str, Any]:
    """A per-question row as stored: the sources cut to a snippet (the index has the rest)."""
    out = {"id": row["id"], "question": question, **gold}
    out.update({k: v for k, v in row.items() if k not in ("id", "sources")})
    out["sources"] = [
        {
            **{k: s.get(k) for k in ("source", "chunk_id", "score")},
            "snippet": (s.get("text") or "")[:SNIPPET_CHARS],
        }
        for s in row.get("sources") or []
    ]
    return out


def build_results(run: dict[str, Any], summary: dict[str, Any], rows_by_arm, items) -> dict:
    by_id = {item.id: item for item in items}
    arms = {}
    for arm, rows in rows_by_arm.items():
        arms[arm] = {
            **run["arms"][arm],
            **summary["arms"][arm],
            "rows": [
                public_row(
                    row,
                    by_id[row["id"]].question,
                    {
                        "gold_label": by_id[row["id"]].label,
                        "gold_answers": list(by_id[row["id"]].answers),
                        "gold_doc_ids": list(by_id[row["id"]].gold_doc_ids),
                    },
                )
                for row in rows
            ],
        }
    return {
        "run": {k: v for k, v in run.items() if k != "arms"},
        "metrics": summary["metrics"],
        "gold_labels": summary["gold_labels"],
        "majority_baseline": summary["majority_baseline"],
        "arms": arms,
        "comparisons": summary["comparisons"],
    }


def write_reports(out: Path, results: dict[str, Any]) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "results": out / "results.json",
        "markdown": out / "report.md",
        "html": out / "report.html",
    }
    atomic_write_text(paths["results"], json.dumps(results, indent=2, ensure_ascii=False))
    atomic_write_text(paths["markdown"], markdown_report(results))
    atomic_write_text(paths["html"], html_report(results))
    for path in paths.values():
        path.chmod(0o644)  # reports are for sharing; the atomic writer creates 0600 files
    logger.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return paths


# ------------------------------------------------------------------------------ Markdown
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
        cells = [arm, model, *[_cell(data["metrics"].get(m)) for m in metrics]]
        cells += [
            _num(data["completion_tokens"]["mean"], ".1f"),
            _num(data["latency_s"]["p50"]),
            _num(data["latency_s"]["p95"]),
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
CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:8px 0 16px;font-size:13px}
th,td{border:1px solid #ddd;padding:4px 6px;text-align:left;vertical-align:top}
th{background:#f4f4f4} td.num{text-align:right;font-variant-numeric:tabular-nums}
.panels{display:flex;flex-wrap:wrap;gap:8px} .ok{color:#2a7} .bad{color:#c33}
details{margin:2px 0} .small{font-size:12px;color:#555} code{font-size:12px}
"""


def _html_table(table: Table) -> str:
    header, rows = table
    out = ["<table><tr>", *[f"<th>{escape(h)}</th>" for h in header], "</tr>"]
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in row) + "</tr>")
    out.append("</table>")
    return "".join(out)


def html_report(results: dict[str, Any]) -> str:
    run = results["run"]
    arms = list(results["arms"])
    data = results["arms"]
    panels = [
        bar_panel(METRIC_TITLES[m], arms, [data[a]["metrics"].get(m) for a in arms])
        for m in results["metrics"]
        if m != "reference_loglik_per_byte"  # negative: the table shows it
    ]
    panels.append(
        bar_panel("tokens / answer", arms, [data[a]["completion_tokens"] for a in arms], upper=None)
    )
    strip = latency_strip(
        arms,
        [[r["latency_s"] for r in data[a]["rows"] if r["latency_s"] is not None] for a in arms],
        [data[a]["latency_s"]["p50"] for a in arms],
        [data[a]["latency_s"]["p95"] for a in arms],
    )
    markdown = markdown_report(results).split("\n")
    intro = escape(markdown[2])
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>Benchmark: {escape(run['dataset_name'])}</title><style>{CSS}</style></head>",
        f"<body><h1>Benchmark: {escape(run['dataset_name'])}</h1><p>{intro}</p>",
        _html_verdict(results),
        "<h2>Summary</h2>",
        _html_table(summary_table(results)),
        "<p class='small'>Means with percentile-bootstrap 95% intervals; whiskers below show "
        "the same intervals.</p>",
        f"<div class='panels'>{''.join(panels)}</div>",
        "<h2>Latency</h2>",
        strip,
    ]
    if results["comparisons"]:
        parts += [
            "<h2>Paired comparisons</h2>",
            "<p class='small'>Difference of means B − A on the same questions, paired bootstrap "
            "95% interval, sign-flip permutation p-value, Holm-adjusted per metric.</p>",
            _html_table(comparison_table(results)),
        ]
    parts += ["<h2>Per-question rows</h2>", _html_rows(results), "</body></html>"]
    return "\n".join(parts)


def _html_verdict(results: dict[str, Any]) -> str:
    def item(line: str) -> str:
        return f"<li>{escape(line.removeprefix('- ').replace('**', ''))}</li>"

    return "".join(
        [
            "<h2>Verdict</h2><p class='small'>Best arm per metric, with the paired difference "
            "to the runner-up (95% bootstrap interval on the same questions; a win needs the "
            "interval above zero and a Holm-adjusted permutation p below 0.05):</p><ul>",
            *[item(line) for line in winner_lines(results)],
            "</ul><p class='small'>What each arm costs (added: over the base arm, per answer):</p>",
            _html_table(cost_table(results)),
            "<p class='small'>Reading (a sentence only where a paired difference is clear, as "
            "above):</p><ul>",
            *[item(line) for line in reading(results)],
            "</ul>",
        ]
    )


def _html_rows(results: dict[str, Any]) -> str:
    arms = list(results["arms"])
    metrics = [m for m in results["metrics"] if m not in ("recall_at_k", "mrr")]
    head = "".join(f"<th>{escape(a)}</th>" for a in arms)
    out = [f"<table><tr><th>question</th><th>gold</th>{head}</tr>"]
    first = results["arms"][arms[0]]["rows"]
    for index, row in enumerate(first):
        gold = row.get("gold_label") or ""
        answers = "; ".join(row.get("gold_answers") or [])
        cells = [
            f"<td><b>{escape(row['id'])}</b> {escape(row['question'])}</td>",
            f"<td>{escape(gold)}<details><summary class='small'>reference</summary>"
            f"<span class='small'>{escape(answers)}</span></details></td>",
        ]
        for arm in arms:
            other = results["arms"][arm]["rows"][index]
            scores = " ".join(
                f"{METRIC_TITLES[m]} {other[m]:.2f}" for m in metrics if other.get(m) is not None
            )
            verdict = ""
            if other.get("label_accuracy") is not None:
                css = "ok" if other["label_accuracy"] == 1.0 else "bad"
                label = escape(str(other["predicted_label"]))
                verdict = f"<span class='{css}'>[{label}]</span> "
            if other.get("likelihood_choice") is not None:
                css = "ok" if other.get("likelihood_accuracy") == 1.0 else "bad"
                choice = escape(str(other["likelihood_choice"]))
                verdict += f"<span class='{css}'>[likelihood: {choice}]</span> "
            text = other.get("answer") or f"(error) {other.get('error') or ''}"
            sources = "".join(
                f"<li><code>{escape(str(s['source']))}</code> {s['score']:.3f}: "
                f"{escape(s['snippet'][:160])}…</li>"
                for s in other.get("sources") or []
            )
            retrieved = (
                f"<details><summary class='small'>sources</summary><ul class='small'>{sources}"
                "</ul></details>"
                if sources
                else ""
            )
            cells.append(
                f"<td>{verdict}{escape(text)}<div class='small'>{escape(scores)} · "
                f"{_num(other.get('latency_s'))} s · {other.get('completion_tokens')} tok</div>"
                f"{retrieved}</td>"
            )
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "".join(out)
