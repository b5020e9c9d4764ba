from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retrieval.chunking import (
    ApproxTokenCounter,
    chunk_document,
    markdown_sections,
    python_sections,
    sentences,
)
from retrieval.loaders import Document

APPROX = ApproxTokenCounter()


def _check_invariants(doc: Document, chunks, counter, max_tokens: int) -> None:
    for chunk in chunks:
        assert doc.text[chunk.start : chunk.end] == chunk.text
        assert chunk.text == chunk.text.strip()
        assert len(counter.spans(chunk.text)) <= max_tokens
    assert len({c.chunk_id for c in chunks}) == len(chunks)


def test_short_text_is_one_chunk() -> None:
    doc = Document.from_text("s", "Just one short paragraph.")
    chunks = chunk_document(doc, 50, 10, APPROX)
    assert [(c.start, c.end, c.heading) for c in chunks] == [(0, 25, ())]


def test_paragraph_chunks_respect_budget_and_overlap(token_counter) -> None:
    paragraphs = [f"Paragraph {i} talks about topic {i} in a few plain words." for i in range(12)]
    doc = Document.from_text("p", "\n\n".join(paragraphs))
    chunks = chunk_document(doc, 40, 15, token_counter)
    _check_invariants(doc, chunks, token_counter, 40)
    assert len(chunks) > 3
    # consecutive chunks share whole paragraphs (overlap), and every paragraph is covered
    assert all(b.start < a.end for a, b in itertools.pairwise(chunks))
    for paragraph in paragraphs:
        assert any(paragraph in c.text for c in chunks)


def test_long_japanese_paragraph_splits_at_sentence_ends(token_counter) -> None:
    sentence = "有給休暇は人事システムから申請し、上長の承認を受けてください。"
    text = sentence * 12  # one paragraph, no spaces, no newlines
    doc = Document.from_text("ja", text)
    chunks = chunk_document(doc, 60, 0, token_counter)
    _check_invariants(doc, chunks, token_counter, 60)
    assert len(chunks) > 1
    assert all(c.text.endswith("。") for c in chunks)
    assert "".join(c.text for c in chunks) == text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "これはペンです。あれは本ですか？はい！",
            ["これはペンです。", "あれは本ですか？", "はい！"],
        ),
        ("「行きます。」と言った。次へ。", ["「行きます。」", "と言った。", "次へ。"]),
        ("First one. Second one? Third!", ["First one.", "Second one?", "Third!"]),
        ("Version 3.5 is out. Done.", ["Version 3.5 is out.", "Done."]),
    ],
)
def test_sentence_boundaries(text: str, expected: list[str]) -> None:
    assert [text[s:e] for s, e in sentences(text)] == expected


def test_unpunctuated_run_is_hard_split_by_tokens() -> None:
    text = " ".join(f"w{i}" for i in range(95))
    doc = Document.from_text("w", text)
    chunks = chunk_document(doc, 20, 5, APPROX)
    _check_invariants(doc, chunks, APPROX, 20)
    assert " ".join(c.text for c in chunks) == text


def test_markdown_sections_carry_heading_paths() -> None:
    text = (
        "Intro line.\n\n# Guide\n\nTop.\n\n## Install\n\nRun it.\n\n```\n# not a heading\n```\n\n"
        "### Linux\n\napt install.\n\n## Usage\n\nCall it.\n"
    )
    got = [(s.heading, text[s.start : s.end].strip()) for s in markdown_sections(text)]
    assert got == [
        ((), "Intro line."),
        (("Guide",), "Top."),
        (("Guide", "Install"), "Run it.\n\n```\n# not a heading\n```"),
        (("Guide", "Install", "Linux"), "apt install."),
        (("Guide", "Usage"), "Call it."),
    ]


def test_markdown_document_chunks_get_headings() -> None:
    doc = Document.from_text("m", "# A\n\nalpha\n\n## B\n\nbeta\n", kind="markdown")
    chunks = chunk_document(doc, 50, 10, APPROX)
    assert [(c.heading, c.text) for c in chunks] == [(("A",), "alpha"), (("A", "B"), "beta")]
    assert chunks[1].embedding_text() == "A > B\nbeta"


PYTHON = '''"""Module doc."""
import os

CONSTANT = 1


@decorator
def first(a):
    return a


class Big:
    """A class."""

    def one(self):
        return 1

    async def two(self):
        return 2
'''


def test_python_sections_functions_and_classes() -> None:
    got = [(s.heading, PYTHON[s.start : s.end].strip()) for s in python_sections(PYTHON)]
    assert [heading for heading, _ in got] == [(), ("def first",), ("class Big",)]
    assert got[1][1].startswith("@decorator\ndef first(a):")
    assert got[2][1].endswith("return 2")


def test_python_large_class_splits_into_methods() -> None:
    sections = python_sections(PYTHON, too_big=lambda start, end: True)
    headings = [s.heading for s in sections]
    assert ("class Big", "def one") in headings
    assert ("class Big", "def two") in headings
    method = next(s for s in sections if s.heading == ("class Big", "def two"))
    assert PYTHON[method.start : method.end].strip() == "async def two(self):\n        return 2"


def test_python_syntax_error_falls_back_to_text() -> None:
    assert len(python_sections("def broken(:\n  pass\n")) == 1


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.text(alphabet="abc de。.\n日本語xyz!?", min_size=0, max_size=120), min_size=1, max_size=8
    ),
    st.integers(min_value=8, max_value=40),
    st.integers(min_value=0, max_value=7),
)
def test_chunk_invariants_property(parts: list[str], max_tokens: int, overlap: int) -> None:
    text = "\n\n".join(parts)
    doc = Document.from_text("h", text)
    chunks = chunk_document(doc, max_tokens, overlap, APPROX)
    _check_invariants(doc, chunks, APPROX, max_tokens)
    covered = set()
    for chunk in chunks:
        covered.update(range(chunk.start, chunk.end))
    assert all(i in covered for i, ch in enumerate(text) if not ch.isspace())
