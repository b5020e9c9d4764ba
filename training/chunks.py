"""Paragraph chunking for the training recipes, behind one small function boundary.

`retrieval.chunking` owns the project's splitters: its Markdown sections (heading paths,
fenced code respected) and paragraph spans are used, so retrieval and training see the same
paragraphs. Training then applies its own sizing policy (merge short paragraphs, cut long
ones at sentence ends). Without the retrieval package (training installed alone) a local
splitter with the same contract is used.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

JAPANESE = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff]")
_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
# Sentence ends: . ! ? before whitespace, and 。！？ with or without it. Markdown list items
# folded into one line also end sentences when Japanese is next to the marker (English
# prose keeps its " - " dashes): a space before "- ", "・ " or "2. " starts a new one, and
# the "2." of such an item is its marker, not a sentence end.
_ITEM = r"(?:[-*・•]|\d{1,2}[.)])"
_NUMBER_MARKER = (  # not after "N." that starts the text, or follows or precedes Japanese
    r"(?<!^\d\.)(?<!^\d\d\.)"
    r"(?<![^\x00-\x7f]\s\d\.)(?<![^\x00-\x7f]\s\d\d\.)"
    r"(?!(?<=\s\d\.)\s+[^\x00-\x7f])(?!(?<=\s\d\d\.)\s+[^\x00-\x7f])"
)
_SENTENCE_END = re.compile(
    rf"(?<=[.!?。！？]){_NUMBER_MARKER}\s+"
    r"|(?<=[。！？])"
    rf"|(?<=[^\x00-\x7f])\s+(?={_ITEM}\s)"
    rf"|\s+(?={_ITEM}\s+[^\x00-\x7f])"
)
_FENCE = ("```", "~~~")
LIST_MARKER = re.compile(rf"{_ITEM}\s+")


@dataclass(frozen=True)
class Chunk:
    text: str
    heading: str  # nearest Markdown heading above the chunk ("" when none)


def is_japanese(text: str) -> bool:
    return bool(JAPANESE.search(text))


def split_sentences(text: str) -> list[str]:
    """Sentence split that also understands 。！？ (no spaces follow them in Japanese)."""
    return [part.strip() for part in _SENTENCE_END.split(text) if part and part.strip()]


def paragraph_chunks(text: str, min_chars: int = 80, max_chars: int = 1200) -> list[Chunk]:
    """Blank-line paragraphs under their heading; short ones merged forward, long ones cut at
    sentence ends. Headings themselves are not chunks."""
    return _size(_blocks(text), min_chars=min_chars, max_chars=max_chars)


def _blocks(text: str) -> list[tuple[str, str]]:
    """(nearest heading, paragraph with its line breaks folded) in document order."""
    try:
        from retrieval.chunking import markdown_sections, paragraphs
    except ImportError:
        return _local_blocks(text)
    blocks = []
    for section in markdown_sections(text):
        heading = section.heading[-1] if section.heading else ""
        for start, end in paragraphs(text, section.start, section.end):
            paragraph = _fold_lines(text[start:end])
            if paragraph:
                blocks.append((heading, paragraph))
    return blocks


def _fold_lines(paragraph: str) -> str:
    if paragraph.lstrip().startswith(_FENCE):  # fenced code keeps its lines and indentation
        return paragraph.strip()
    lines = [line.strip() for line in paragraph.splitlines() if line.strip()]
    joined = ""
    for line in lines:  # Japanese lines join without a space
        glue = "" if not joined or (is_japanese(joined[-1]) and is_japanese(line[0])) else " "
        joined += glue + line
    return joined


def _local_blocks(text: str) -> list[tuple[str, str]]:
    blocks: list[tuple[str, str]] = []  # (heading, paragraph)
    heading = ""
    current: list[str] = []

    def flush() -> None:
        if current:
            paragraph = _fold_lines("\n".join(current))
            if paragraph:
                blocks.append((heading, paragraph))
            current.clear()

    for line in text.splitlines():
        match = _HEADING.match(line.strip())
        if match:
            flush()
            heading = match.group(2).strip()
        elif not line.strip():
            flush()
        else:
            current.append(line)
    flush()
    return blocks


def _size(blocks: list[tuple[str, str]], min_chars: int, max_chars: int) -> list[Chunk]:
    merged: list[Chunk] = []
    pending = ""
    pending_heading = ""
    for block_heading, paragraph in blocks:
        if pending and block_heading != pending_heading:
            merged.append(Chunk(pending, pending_heading))
            pending = ""
        pending_heading = block_heading if not pending else pending_heading
        pending = f"{pending} {paragraph}".strip() if pending else paragraph
        if len(pending) >= min_chars:
            merged.extend(_cut(pending, pending_heading, max_chars))
            pending = ""
    if pending:
        if merged and merged[-1].heading == pending_heading:
            last = merged.pop()
            merged.extend(_cut(f"{last.text} {pending}", pending_heading, max_chars))
        else:
            merged.append(Chunk(pending, pending_heading))
    return merged


def _cut(paragraph: str, heading: str, max_chars: int) -> list[Chunk]:
    if len(paragraph) <= max_chars:
        return [Chunk(paragraph, heading)]
    chunks: list[Chunk] = []
    buffer = ""
    code = paragraph.startswith(_FENCE)  # cut at line ends, not at full stops
    joiner = "\n" if code else "" if is_japanese(paragraph) else " "
    for sentence in paragraph.splitlines() if code else split_sentences(paragraph):
        if buffer and len(buffer) + len(sentence) + 1 > max_chars:
            chunks.append(Chunk(buffer, heading))
            buffer = ""
        list_item = not code and LIST_MARKER.match(sentence)
        glue = " " if list_item else joiner  # keep "- a - b" items apart
        buffer = f"{buffer}{glue}{sentence}" if buffer else sentence
        while len(buffer) > max_chars:  # one sentence longer than the limit
            chunks.append(Chunk(buffer[:max_chars], heading))
            buffer = buffer[max_chars:]
    if buffer:
        chunks.append(Chunk(buffer, heading))
    return chunks
