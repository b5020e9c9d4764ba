"""Benchmark questions: the bench's own JSONL format, plus an adapter for PubMedQA's layout.

One JSON object per line::

    {"id": "q1", "question": "...", "answers": ["reference", ...], "label": "yes",
     "choices": ["yes", "no"], "keywords": ["Keystone"],
     "gold_doc_ids": ["doc-7"], "context": "passage" | ["paragraph", ...]}

`answers` and/or `label` are required (free-text and classification-style questions);
`choices` (the answer set; default: the dataset's labels) makes a row scorable by
likelihood, `label` then names the right one; `keywords` (any one must occur in a right
answer) enables keyword hit rate; `gold_doc_ids` (or `doc_id`) enables retrieval recall;
`context` lets `--build-index` index the passages. PubMedQA rows (`contexts`,
`final_decision`, `long_answer`) are recognised and converted.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PUBMEDQA_PREFIX = "pubmedqa:"


@dataclass(frozen=True)
class QAItem:
    id: str
    question: str
    answers: tuple[str, ...] = ()
    label: str | None = None
    gold_doc_ids: tuple[str, ...] = ()
    context: tuple[str, ...] = ()
    title: str = ""
    choices: tuple[str, ...] = ()
    keywords: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def context_doc_id(self) -> str:
        """The id `--build-index` gives this row's context: its first gold doc, else its id."""
        return self.gold_doc_ids[0] if self.gold_doc_ids else self.id


def _strings(value: Any, what: str, row_id: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError(f"row {row_id}: {what} must be a string or a list of strings")


def _folded(values: tuple[str, ...]) -> list[str]:
    return [value.strip().lower() for value in values]


def from_pubmedqa(row: dict[str, Any]) -> QAItem:
    """PubMedQA PQA-L: the abstract (without its conclusion) is the context and the gold
    document; `final_decision` is the label; `long_answer` (the conclusion) the reference.
    The title is left empty: PubMedQA questions are the article titles, and indexing them
    would hand retrieval the answer to the lookup."""
    row_id = str(row["id"])
    return QAItem(
        id=row_id,
        question=row["question"],
        answers=(row["long_answer"],) if row.get("long_answer") else (),
        label=row.get("final_decision"),
        gold_doc_ids=(f"{PUBMEDQA_PREFIX}{row_id}",),
        context=tuple(row["contexts"]),
        meta={"year": row.get("year"), "format": "pubmedqa"},
    )


def from_row(row: dict[str, Any], line: int) -> QAItem:
    """One bench-format row (or a PubMedQA row, recognised by its fields)."""
    if "final_decision" in row and "contexts" in row:
        return from_pubmedqa(row)
    row_id = str(row.get("id", line))
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"row {row_id} (line {line}): 'question' must be a non-empty string")
    answers = _strings(row.get("answers", row.get("answer")), "answers", row_id)
    label = row.get("label")
    if label is not None and not isinstance(label, str):
        raise ValueError(f"row {row_id}: 'label' must be a string")
    if not answers and label is None:
        raise ValueError(f"row {row_id}: give 'answers' (reference strings) and/or 'label'")
    choices = _strings(row.get("choices"), "choices", row_id)
    if choices and (label is None or label.strip().lower() not in _folded(choices)):
        raise ValueError(f"row {row_id}: with 'choices', 'label' must name one of them")
    if len(set(_folded(choices))) != len(choices):
        raise ValueError(f"row {row_id}: 'choices' repeats an answer")
    gold = row.get("gold_doc_ids", row.get("doc_id"))
    return QAItem(
        id=row_id,
        question=question.strip(),
        answers=answers,
        label=label.strip().lower() if label else None,
        gold_doc_ids=_strings(gold, "gold_doc_ids", row_id),
        context=_strings(row.get("context"), "context", row_id),
        title=str(row.get("title") or ""),
        choices=choices,
        keywords=_strings(row.get("keywords"), "keywords", row_id),
        meta={k: v for k, v in row.items() if k == "meta" or k.startswith("x_")},
    )


def load_dataset(path: str | Path, limit: int | None = None) -> list[QAItem]:
    """The first `limit` rows of a JSONL file (file order, so runs are comparable)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset not found: {path}")
    items: list[QAItem] = []
    seen: set[str] = set()
    # Iterate the handle, not splitlines(): PubMedQA text contains U+2028.
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
            item = from_row(row, line_no)
            if item.id in seen:
                raise ValueError(f"{path}:{line_no}: duplicate id {item.id!r}")
            seen.add(item.id)
            items.append(item)
            if limit and len(items) >= limit:
                break
    if not items:
        raise ValueError(f"{path}: no questions")
    logger.info("loaded %d questions from %s", len(items), path)
    return items


def label_set(items: list[QAItem]) -> tuple[str, ...]:
    """The labels in use, ordered yes/no/maybe first (the parser's vocabulary)."""
    known = ("yes", "no", "maybe")
    present = {item.label for item in items if item.label}
    return tuple([x for x in known if x in present] + sorted(present - set(known)))


def answer_choices(item: QAItem, labels: tuple[str, ...]) -> tuple[str, ...]:
    """The answers a likelihood scorer weighs for this row: its own `choices`, else the
    dataset's labels capitalised (the answer begins a sentence, as the label instruction
    asks); () for a free-text row."""
    if item.choices:
        return item.choices
    if item.label is None:
        return ()
    return tuple(label[:1].upper() + label[1:] for label in labels)


def gold_choice(item: QAItem, choices: tuple[str, ...]) -> int | None:
    """Index of the right answer among `choices` (matched case-insensitively)."""
    if item.label is None:
        return None
    folded = _folded(choices)
    return folded.index(item.label) if item.label in folded else None


def context_documents(items: list[QAItem]) -> list[tuple[str, str, str]]:
    """(doc id, title, text) for every distinct context, for building an index."""
    docs: dict[str, tuple[str, str, str]] = {}
    for item in items:
        if item.context and item.context_doc_id not in docs:
            docs[item.context_doc_id] = (
                item.context_doc_id,
                item.title,
                "\n\n".join(item.context),
            )
    return list(docs.values())
