"""The one RAG prompt template: numbered sources, then the question.

The server puts the returned string into the user turn. Sources are numbered in the order
of the hits ([1] is hits[0]), so a citation [n] in the answer maps back to hits[n - 1].

A source is its text alone unless `labels` (retrieval.source_labels) puts its `title >
heading` line above it: given those lines, the bundled 135M model listed them back instead of
answering (the demo preset's rag arm, 20 questions: keyword hit 0.25 with labels, 0.65
without; token F1 0.159 and 0.293). The response's `sources` carry the labels either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

# Short and plain on purpose: small models (the bundled 135M one) copy long instructions back
# instead of answering; measured on the test questions in tests/server/test_rag.py.
RAG_PROMPT_TEMPLATE = """\
Context:
{sources}

Question: {question}
Answer the question using the context. Cite sources as [1], [2]."""

NO_SOURCES = "(no sources found)"


class _Hit(Protocol):
    title: str
    heading: tuple[str, ...]
    text: str


def source_label(hit: _Hit) -> str:
    """`title > heading > path`, without repeating a heading equal to the title."""
    parts = [hit.title] if hit.title else []
    parts.extend(part for part in hit.heading if part and part != hit.title)
    return " > ".join(parts)


def format_rag_prompt(
    question: str,
    hits: Sequence[_Hit],
    *,
    max_source_chars: int | None = None,
    labels: bool = False,
) -> str:
    """Fill RAG_PROMPT_TEMPLATE. Each source is ``[n] text``, or with `labels` ``[n] label``
    on one line and its text on the next; `max_source_chars` cuts each text (with "…") to
    bound the prompt length."""
    blocks = []
    for number, hit in enumerate(hits, start=1):
        text = hit.text.strip()
        if max_source_chars is not None and len(text) > max_source_chars:
            text = text[: max(0, max_source_chars - 1)].rstrip() + "…"
        label = source_label(hit) if labels else ""
        blocks.append(f"[{number}] {label}\n{text}" if label else f"[{number}] {text}")
    sources = "\n\n".join(blocks) if blocks else NO_SOURCES
    return RAG_PROMPT_TEMPLATE.format(sources=sources, question=question.strip())
