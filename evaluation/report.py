"""Write a benchmark's results: results.json (everything), report.md and report.html.

results.json is the record: the run's settings, per arm every metric with its interval and
every per-question row, and the paired comparisons. The Markdown (report_markdown.py) and
HTML (report_html.py) reports are views of it; the HTML one is self-contained (inline CSS and
SVG, no scripts or external assets) and carries the per-question rows for error analysis.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from evaluation.report_html import html_report
from evaluation.report_markdown import markdown_report
from ragtune.fileio import atomic_write_text

logger = logging.getLogger(__name__)

SNIPPET_CHARS = 300


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
