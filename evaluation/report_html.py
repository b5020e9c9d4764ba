"""The HTML view of a benchmark's results (report.py): self-contained (inline CSS and SVG,
no scripts or external assets), with the per-question rows for error analysis."""

from __future__ import annotations

from html import escape
from typing import Any

from evaluation.plots import bar_panel, latency_strip
from evaluation.report_markdown import (
    Table,
    comparison_table,
    markdown_report,
    number,
    summary_table,
)
from evaluation.scoring import METRIC_TITLES
from evaluation.verdict import cost_table, reading, winner_lines

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
                f"{number(other.get('latency_s'))} s · {other.get('completion_tokens')} tok</div>"
                f"{retrieved}</td>"
            )
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "".join(out)
