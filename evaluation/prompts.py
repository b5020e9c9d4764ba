"""The conversation each arm sends, rebuilt for likelihood scoring.

Generation sends `[system, user: question]` (plus `rag` for the RAG arms, where the server
puts the retrieved sources into the user turn). Scoring needs that prompt as text, so the
RAG user turn is rebuilt here with the server's own template (`retrieval.prompt`) from the
sources the arm's generation request got back; their headings come from the index's
chunks on disk when the bench knows the index root. Whether the rebuilt prompt is the one
the server used is checked by its token count against the generation's `prompt_tokens`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrieval.prompt import format_rag_prompt


@dataclass(frozen=True)
class _Hit:
    title: str
    heading: tuple[str, ...]
    text: str


def chat_messages(system_prompt: str | None, user: str) -> list[dict[str, str]]:
    """The instruction as a system turn, the question (or RAG prompt) as the user turn."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*messages, {"role": "user", "content": user}]


def rag_user_turn(
    question: str,
    sources: list[dict[str, Any]],
    headings: dict[str, tuple[str, ...]],
    max_source_chars: int | None,
    labels: bool = False,
) -> str:
    """The user turn the server built for a RAG request that returned `sources`."""
    hits = [
        _Hit(
            title=source.get("title") or "",
            heading=headings.get(str(source.get("chunk_id")), ()),
            text=source.get("text") or "",
        )
        for source in sources
    ]
    return format_rag_prompt(question, hits, max_source_chars=max_source_chars, labels=labels)


def load_headings(index_root: Path | None, index: str | None) -> dict[str, tuple[str, ...]]:
    """chunk id -> heading path from the index's current generation ({} if unknown)."""
    if index_root is None or index is None:
        return {}
    directory = index_root / index
    current = directory / "CURRENT"
    if not current.is_file():
        return {}
    chunks = directory / current.read_text(encoding="utf-8").strip() / "chunks.jsonl"
    if not chunks.is_file():
        return {}
    headings: dict[str, tuple[str, ...]] = {}
    with open(chunks, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                chunk = json.loads(line)
                headings[str(chunk.get("id"))] = tuple(chunk.get("heading") or ())
    return headings
