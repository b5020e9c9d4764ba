"""Split documents into chunks that fit the embedder: structure first, then token budget.

Structure gives *sections* (markdown headings, Python functions/classes, PDF pages) that a
chunk never crosses. Inside a section, chunks are runs of paragraphs up to `max_tokens`;
a paragraph that is too long is split at sentence ends (``. ! ?`` and Japanese ``。！？``,
plus line breaks), and a sentence that is still too long at token boundaries. Consecutive
chunks of a section share up to `overlap` tokens of whole paragraphs/sentences.

Tokens are counted with the embedder's own tokenizer by default (`HFTokenCounter`), so a
chunk is never silently truncated by the model's 256-token window; `ApproxTokenCounter`
is a dependency-free approximation (one token per word, CJK character or symbol).
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from retrieval.loaders import Document, Section


class TokenCounter(Protocol):
    name: str

    def spans(self, text: str) -> list[tuple[int, int]]:
        """Character (start, end) of every token of `text`, in order."""
        ...


class ApproxTokenCounter:
    """Words, single CJK characters and single symbols each count as one token."""

    name = "approx-v1"
    _TOKEN = re.compile(
        r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]"
        r"|(?:(?![\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af])\w)+"
        r"|[^\w\s]"
    )

    def spans(self, text: str) -> list[tuple[int, int]]:
        return [match.span() for match in self._TOKEN.finditer(text)]


class HFTokenCounter:
    """Counts with a Hugging Face fast tokenizer (the embedder's), without special tokens."""

    def __init__(self, tokenizer: Any, name: str = "embedder", lock: Any = None) -> None:
        self._tokenizer = tokenizer
        self._lock = lock or contextlib.nullcontext()
        self.name = name

    def spans(self, text: str) -> list[tuple[int, int]]:
        with self._lock:
            encoded = self._tokenizer(
                text, add_special_tokens=False, return_offsets_mapping=True, verbose=False
            )
        return [(start, end) for start, end in encoded["offset_mapping"] if end > start]


@dataclass(frozen=True)
class Chunk:
    """One retrievable unit. `start`/`end` index into the document text (text == doc[s:e])."""

    chunk_id: str
    source: str
    title: str
    heading: tuple[str, ...]
    start: int
    end: int
    doc_hash: str
    text: str

    def embedding_text(self) -> str:
        """What is embedded and BM25-indexed: the heading path gives a body its context."""
        if self.heading:
            return " > ".join(self.heading) + "\n" + self.text
        return self.text

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.chunk_id,
            "source": self.source,
            "title": self.title,
            "heading": list(self.heading),
            "start": self.start,
            "end": self.end,
            "doc_hash": self.doc_hash,
            "text": self.text,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Chunk:
        return cls(
            chunk_id=str(data["id"]),
            source=str(data["source"]),
            title=str(data["title"]),
            heading=tuple(str(part) for part in data["heading"]),
            start=int(data["start"]),
            end=int(data["end"]),
            doc_hash=str(data["doc_hash"]),
            text=str(data["text"]),
        )


def chunk_id_for(source: str, doc_hash: str, ordinal: int) -> str:
    """Stable while the (source, content) pair is unchanged; unique across sources."""
    digest = hashlib.sha256(f"{source}\0{doc_hash}".encode()).hexdigest()[:16]
    return f"{digest}-{ordinal:04d}"


# ---------------------------------------------------------------------------- sections


def markdown_sections(text: str) -> list[Section]:
    """ATX headings (outside fenced code) open sections; the heading line itself is carried
    in the heading path, not in the body."""
    sections: list[Section] = []
    stack: list[tuple[int, str]] = []
    body_start = 0
    heading: tuple[str, ...] = ()
    fence: str | None = None
    offset = 0
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        fence_match = re.match(r"^ {0,3}(`{3,}|~{3,})", line)
        if fence_match:
            marker = fence_match.group(1)[0]
            if fence is None:
                fence = marker
            elif marker == fence:
                fence = None
        elif fence is None:
            match = re.match(r"^ {0,3}(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", line.rstrip("\n"))
            if match and stripped:
                sections.append(Section(body_start, offset, heading))
                level = len(match.group(1))
                while stack and stack[-1][0] >= level:
                    stack.pop()
                stack.append((level, match.group(2).strip()))
                heading = tuple(title for _, title in stack)
                body_start = offset + len(line)
        offset += len(line)
    sections.append(Section(body_start, len(text), heading))
    return [section for section in sections if text[section.start : section.end].strip()]


def python_sections(
    text: str, too_big: Callable[[int, int], bool] = lambda start, end: False
) -> list[Section]:
    """Top-level functions and classes (with decorators) are sections; a class for which
    `too_big(start, end)` is true is split into its header and one section per method.
    Module-level code between definitions forms its own sections. Syntax errors fall back
    to one whole-file section."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return [Section(0, len(text))]
    line_starts = [0]
    for line in text.splitlines(keepends=True):
        line_starts.append(line_starts[-1] + len(line))

    def span(node: ast.AST) -> tuple[int, int]:
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        return line_starts[first - 1], line_starts[min(node.end_lineno or first, len(text))]

    definitions = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    sections: list[Section] = []
    cursor = 0
    for node in tree.body:
        if not isinstance(node, definitions):
            continue
        start, end = span(node)
        if start > cursor:
            sections.append(Section(cursor, start))
        label = ("class " if isinstance(node, ast.ClassDef) else "def ") + node.name
        if isinstance(node, ast.ClassDef) and too_big(start, end):
            inner = start
            for child in node.body:
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    child_start, child_end = span(child)
                    if child_start > inner:
                        sections.append(Section(inner, child_start, (label,)))
                    sections.append(Section(child_start, child_end, (label, "def " + child.name)))
                    inner = child_end
            if end > inner:
                sections.append(Section(inner, end, (label,)))
        else:
            sections.append(Section(start, end, (label,)))
        cursor = end
    if cursor < len(text):
        sections.append(Section(cursor, len(text)))
    return [section for section in sections if text[section.start : section.end].strip()]


# ---------------------------------------------------------------------------- splitting

_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")
# Sentence ends: Latin . ! ? before whitespace, Japanese/full-width 。！？ (with closing
# brackets/quotes) even without whitespace, and line breaks inside a paragraph.
_SENTENCE_END = re.compile(r"[。！？]+[」』）\)\"'’”]*\s*|[.!?]+[\"'’”\)]*(?:\s+|$)|\n\s*")


def _trim(text: str, start: int, end: int) -> tuple[int, int] | None:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return (start, end) if end > start else None


def _split(pattern: re.Pattern[str], text: str, start: int, end: int) -> list[tuple[int, int]]:
    pieces = []
    position = start
    for match in pattern.finditer(text, start, end):
        piece = _trim(text, position, match.end())
        if piece:
            pieces.append(piece)
        position = match.end()
    tail = _trim(text, position, end)
    if tail:
        pieces.append(tail)
    return pieces


def paragraphs(text: str, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    return _split(_PARAGRAPH_BREAK, text, start, len(text) if end is None else end)


def sentences(text: str, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    return _split(_SENTENCE_END, text, start, len(text) if end is None else end)


def _units(
    text: str, start: int, end: int, max_tokens: int, counter: TokenCounter
) -> list[tuple[int, int, int]]:
    """(start, end, tokens) pieces, each at most max_tokens, that tile the span."""
    units: list[tuple[int, int, int]] = []
    for p_start, p_end in paragraphs(text, start, end):
        count = len(counter.spans(text[p_start:p_end]))
        if count <= max_tokens:
            units.append((p_start, p_end, count))
            continue
        for s_start, s_end in sentences(text, p_start, p_end):
            token_spans = counter.spans(text[s_start:s_end])
            if len(token_spans) <= max_tokens:
                units.append((s_start, s_end, len(token_spans)))
                continue
            for first in range(0, len(token_spans), max_tokens):
                window = token_spans[first : first + max_tokens]
                w_start = s_start + window[0][0]
                w_end = s_end if first + max_tokens >= len(token_spans) else s_start + window[-1][1]
                units.append((w_start, w_end, len(window)))
    return units


def _pack(
    units: list[tuple[int, int, int]], max_tokens: int, overlap: int
) -> list[tuple[int, int]]:
    """Greedy runs of units up to max_tokens; the next run restarts at the last units of the
    previous one whose tokens sum to at most `overlap` (whole units only, always progressing)."""
    spans: list[tuple[int, int]] = []
    first = 0
    while first < len(units):
        last = first
        total = units[first][2]
        while last + 1 < len(units) and total + units[last + 1][2] <= max_tokens:
            last += 1
            total += units[last][2]
        spans.append((units[first][0], units[last][1]))
        if last + 1 >= len(units):
            break
        restart = last + 1
        carried = 0
        while restart - 1 > first and carried + units[restart - 1][2] <= overlap:
            restart -= 1
            carried += units[restart][2]
        first = restart
    return spans


def chunk_section(
    text: str, section: Section, max_tokens: int, overlap: int, counter: TokenCounter
) -> list[tuple[int, int]]:
    """Character spans of the chunks of one section."""
    span = _trim(text, section.start, section.end)
    if span is None:
        return []
    if len(counter.spans(text[span[0] : span[1]])) <= max_tokens:
        return [span]
    return _pack(_units(text, span[0], span[1], max_tokens, counter), max_tokens, overlap)


def document_sections(doc: Document, max_tokens: int, counter: TokenCounter) -> list[Section]:
    """The structural sections for a document's kind (loader-given ones win)."""
    if doc.sections:
        return list(doc.sections)
    if doc.kind == "markdown":
        return markdown_sections(doc.text)
    if doc.kind == "python":

        def too_big(start: int, end: int) -> bool:
            return len(counter.spans(doc.text[start:end])) > max_tokens

        return python_sections(doc.text, too_big)
    return [Section(0, len(doc.text))]


def chunk_document(
    doc: Document, max_tokens: int, overlap: int, counter: TokenCounter | None = None
) -> list[Chunk]:
    """All chunks of a document, in text order, with ids, spans and heading paths."""
    if overlap >= max_tokens:
        raise ValueError("overlap must be smaller than max_tokens")
    counter = counter or ApproxTokenCounter()
    chunks: list[Chunk] = []
    for section in document_sections(doc, max_tokens, counter):
        for start, end in chunk_section(doc.text, section, max_tokens, overlap, counter):
            chunks.append(
                Chunk(
                    chunk_id=chunk_id_for(doc.source, doc.doc_hash, len(chunks)),
                    source=doc.source,
                    title=doc.title,
                    heading=section.heading,
                    start=start,
                    end=end,
                    doc_hash=doc.doc_hash,
                    text=doc.text[start:end],
                )
            )
    return chunks
