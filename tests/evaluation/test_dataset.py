"""The bench's JSONL format and the PubMedQA adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evaluation.dataset import context_documents, label_set, load_dataset

REPO = Path(__file__).resolve().parents[2]
PUBMEDQA = REPO / "data" / "pubmedqa" / "pqal_dev.jsonl"


def write(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_bench_format(tmp_path: Path) -> None:
    path = write(
        tmp_path / "qa.jsonl",
        [
            {"id": "q1", "question": " Who? ", "answers": ["Ada"], "gold_doc_ids": ["d1"]},
            {"id": "q2", "question": "Is it?", "label": "Yes", "context": ["p1", "p2"]},
            {"id": "q3", "question": "What?", "answer": "single", "label": "no"},
        ],
    )
    items = load_dataset(path)
    assert [i.id for i in items] == ["q1", "q2", "q3"]
    assert items[0].question == "Who?" and items[0].answers == ("Ada",)
    assert items[0].gold_doc_ids == ("d1",) and items[0].label is None
    assert items[1].label == "yes" and items[1].context == ("p1", "p2")
    assert items[2].answers == ("single",)
    assert label_set(items) == ("yes", "no")
    assert context_documents(items) == [("q2", "", "p1\n\np2")]
    assert [i.id for i in load_dataset(path, limit=2)] == ["q1", "q2"]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"id": "a", "answers": ["x"]}], "question"),
        ([{"id": "a", "question": "q?"}], "answers"),
        ([{"id": "a", "question": "q?", "answers": [1]}], "list of strings"),
        ([{"id": "a", "question": "q?", "label": "yes"}] * 2, "duplicate"),
        ([], "no questions"),
    ],
)
def test_bad_rows_are_rejected(tmp_path: Path, rows: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_dataset(write(tmp_path / "bad.jsonl", rows))


def test_invalid_json_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text('{"id": "a", "question": "q", "label": "no"}\n{oops\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken.jsonl:2"):
        load_dataset(path)
    with pytest.raises(FileNotFoundError):
        load_dataset(tmp_path / "missing.jsonl")


def test_pubmedqa_rows_are_converted() -> None:
    items = load_dataset(PUBMEDQA, limit=3)
    first = items[0]
    assert first.id == "10808977"
    assert first.label == "yes"
    assert first.gold_doc_ids == ("pubmedqa:10808977",)
    assert first.answers and first.answers[0].startswith("The effects of the intervention")
    assert len(first.context) == 6 and first.title == ""
    # the conclusion (what is scored) is never part of the indexed / trained context
    assert all(first.answers[0] not in text for _, _, text in context_documents(items))


def test_shipped_pubmedqa_copy_is_complete() -> None:
    assert (PUBMEDQA.parent / "LICENSE").read_text().startswith("MIT License")
    items = load_dataset(PUBMEDQA)
    assert len(items) == 500
    assert label_set(items) == ("yes", "no", "maybe")
