"""Scoring and the three report files, from hand-made rows (no server)."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

from evaluation.dataset import QAItem
from evaluation.report import build_results, write_reports
from evaluation.scoring import summarise

ITEMS = [
    QAItem("q1", "Does A help?", ("A helps patients.",), "yes", ("d1",)),
    QAItem("q2", "Does B help?", ("B does not help.",), "no", ("d2",)),
    QAItem("q3", "Does C <help>?", ("Unclear & mixed.",), "maybe", ("d3",)),
]


def row(item: QAItem, arm: str, answer: str, sources: list[str], latency: float) -> dict:
    return {
        "id": item.id,
        "arm": arm,
        "model": "m",
        "rag": bool(sources),
        "answer": answer,
        "error": None,
        "latency_s": latency,
        "finish_reason": "stop",
        "prompt_tokens": 10,
        "completion_tokens": len(answer.split()),
        "sources": [
            {"source": s, "chunk_id": f"{s}-0", "score": 1.0, "text": "A helps patients."}
            for s in sources
        ],
    }


def make_rows() -> dict[str, list[dict]]:
    return {
        "base": [
            row(ITEMS[0], "base", "No.", [], 0.5),
            row(ITEMS[1], "base", "No, B does not help.", [], 0.7),
            row(ITEMS[2], "base", "Cats.", [], 0.9),
        ],
        "rag": [
            row(ITEMS[0], "rag", "Yes, A helps patients [1].", ["d1"], 1.5),
            row(ITEMS[1], "rag", "Yes.", ["d9", "d2"], 1.2),
            row(ITEMS[2], "rag", "Maybe <b>.", ["d9"], 1.1),
        ],
    }


class _Balance(HTMLParser):
    VOID = frozenset({"meta", "br", "img", "input", "hr", "link", "circle", "rect", "line", "path"})

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        pass

    def handle_endtag(self, tag: str) -> None:
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}> with open {self.stack[-3:]}")
        else:
            self.stack.pop()


def test_scores_and_summaries() -> None:
    rows = make_rows()
    summary = summarise(ITEMS, rows, labels=("yes", "no", "maybe"), top_k=2, seed=0, resamples=200)
    base, rag = rows["base"], rows["rag"]
    assert [r["predicted_label"] for r in base] == ["no", "no", None]
    assert [r["label_accuracy"] for r in rag] == [1.0, 0.0, 1.0]
    assert [r["recall_at_k"] for r in rag] == [1.0, 1.0, 0.0]
    assert [r["mrr"] for r in rag] == [1.0, 0.5, 0.0]
    assert all(r["recall_at_k"] is None and r["groundedness"] is None for r in base)
    assert rag[0]["groundedness"] == 1.0  # a, helps, patients all in the source
    assert summary["arms"]["rag"]["metrics"]["label_accuracy"]["mean"] == round(2 / 3, 6)
    assert summary["arms"]["base"]["metrics"]["recall_at_k"]["n"] == 0
    assert summary["arms"]["base"]["predicted_labels"] == {"None": 1, "no": 2}
    assert summary["arms"]["rag"]["latency_s"]["p50"] == 1.2
    assert summary["gold_labels"] == {"maybe": 1, "no": 1, "yes": 1}
    assert summary["majority_baseline"] == {"label": "maybe", "accuracy": round(1 / 3, 6)}
    label_test = [c for c in summary["comparisons"] if c["metric"] == "label_accuracy"]
    assert len(label_test) == 1 and label_test[0]["a"] == "base" and label_test[0]["b"] == "rag"
    assert label_test[0]["diff"] == round(2 / 3 - 1 / 3, 6)
    # recall is only scored in one arm, so there is no pair to compare
    assert not [c for c in summary["comparisons"] if c["metric"] == "recall_at_k"]


def test_report_files_are_well_formed(tmp_path: Path) -> None:
    rows = make_rows()
    summary = summarise(ITEMS, rows, labels=("yes", "no", "maybe"), top_k=2, seed=0, resamples=200)
    run = {
        "dataset": "qa.jsonl",
        "dataset_name": "toy <set>",
        "questions": 3,
        "seed": 0,
        "resamples": 200,
        "settings": {
            "temperature": 0.0,
            "max_tokens": 8,
            "top_k": 2,
            "index": "i",
            "concurrency": 1,
        },
        "arms": {"base": {"model": "m", "rag": False}, "rag": {"model": "m", "rag": True}},
        "server": "test",
        "duration_s": 1.0,
    }
    results = build_results(run, summary, rows, ITEMS)
    paths = write_reports(tmp_path, results)

    loaded = json.loads(paths["results"].read_text(encoding="utf-8"))
    assert set(loaded) == {
        "run",
        "metrics",
        "gold_labels",
        "majority_baseline",
        "arms",
        "comparisons",
    }
    rag = loaded["arms"]["rag"]
    assert rag["rag"] is True and len(rag["rows"]) == 3
    assert set(rag["metrics"]["label_accuracy"]) == {"mean", "low", "high", "n"}
    assert rag["rows"][0]["sources"][0]["snippet"] == "A helps patients."
    assert rag["rows"][0]["gold_label"] == "yes" and rag["rows"][0]["question"] == "Does A help?"

    markdown = paths["markdown"].read_text(encoding="utf-8")
    assert markdown.startswith("# Benchmark: toy <set>")
    assert markdown.index("## Verdict") < markdown.index("## Summary")
    summary_part = markdown.split("## Summary", 1)[1]
    table = [line for line in summary_part.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| arm | model | label accuracy | decision given |")
    assert len({line.count("|") for line in table[:3]}) == 1  # header, base, rag rows align
    assert "## Paired comparisons" in markdown
    assert "Always answering the most common label (maybe) scores 0.333" in markdown

    html = paths["html"].read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and "<script" not in html
    assert "Does C &lt;help&gt;?" in html and "Maybe &lt;b&gt;." in html  # escaped
    checker = _Balance()
    checker.feed(html)
    assert checker.errors == [] and checker.stack == []
    svgs = re.findall(r"<svg.*?</svg>", html, flags=re.S)
    assert len(svgs) == len(loaded["metrics"]) + 2  # metric panels, tokens, latency
    for svg in svgs:
        ET.fromstring(svg)  # each chart is valid XML
    assert html.count("<circle") == 6  # one dot per request
