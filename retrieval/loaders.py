"""Turn files into `Document`s: plain text plus the structure the chunkers need.

Every loader returns the document text that chunk character spans point into; for HTML
and PDF that is the extracted text, not the file bytes.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from ragtune.fileio import sha256_file
from retrieval.errors import LoaderError

logger = logging.getLogger(__name__)

TEXT_EXTENSIONS = frozenset({".txt", ".text", ".rst", ".log"})
MARKDOWN_EXTENSIONS = frozenset({".md", ".markdown"})
HTML_EXTENSIONS = frozenset({".html", ".htm", ".xhtml"})
PDF_EXTENSIONS = frozenset({".pdf"})
PYTHON_EXTENSIONS = frozenset({".py", ".pyi"})
CODE_EXTENSIONS = frozenset(
    {
        ".c", ".h", ".cc", ".cpp", ".hpp", ".cs", ".go", ".java", ".kt", ".js", ".jsx",
        ".ts", ".tsx", ".rs", ".rb", ".php", ".swift", ".scala", ".sh", ".bash", ".sql",
        ".yaml", ".yml", ".toml", ".json", ".ini", ".cfg",
    }
)  # fmt: skip
SUPPORTED_EXTENSIONS = (
    TEXT_EXTENSIONS
    | MARKDOWN_EXTENSIONS
    | HTML_EXTENSIONS
    | PDF_EXTENSIONS
    | PYTHON_EXTENSIONS
    | CODE_EXTENSIONS
)
# Directory walks skip these (and every dot-directory): they hold generated or vendored files.
SKIPPED_DIRECTORIES = frozenset({"__pycache__", "node_modules", "venv", "site-packages"})


@dataclass(frozen=True)
class Section:
    """A span of the document text that chunks never cross, with its heading path."""

    start: int
    end: int
    heading: tuple[str, ...] = ()


@dataclass(frozen=True)
class Document:
    """One source's text. `kind` picks the chunker: text, markdown, python, code or pdf."""

    source: str
    text: str
    title: str
    kind: str
    doc_hash: str
    sections: tuple[Section, ...] = field(default=())

    @classmethod
    def from_text(cls, source: str, text: str, *, title: str = "", kind: str = "text") -> Document:
        """A document that does not come from a file; hashed by its UTF-8 text."""
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        return cls(source=source, text=text, title=title, kind=kind, doc_hash=digest)


def source_key(path: Path) -> str:
    """The identity of a file-backed document: its resolved absolute path."""
    return str(path.resolve())


def iter_source_files(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Files named directly (any extension), plus supported files found under directories."""
    seen: set[Path] = set()
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"source not found: {path}")
        if path.is_file():
            candidates: Iterable[Path] = [path]
        else:
            candidates = _walk(path)
        for candidate in candidates:
            resolved = candidate.resolve()
            if resolved not in seen:
                seen.add(resolved)
                yield candidate


def _walk(directory: Path) -> Iterator[Path]:
    for entry in sorted(directory.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if entry.name not in SKIPPED_DIRECTORIES:
                yield from _walk(entry)
        elif entry.is_file() and entry.suffix.lower() in SUPPORTED_EXTENSIONS:
            yield entry


def file_hash(path: Path) -> str:
    return sha256_file(path)


def load_file(path: Path, *, doc_hash: str | None = None) -> Document:
    """Load one file by extension; unknown extensions are read as text if they decode."""
    path = Path(path)
    suffix = path.suffix.lower()
    digest = doc_hash or file_hash(path)
    source = source_key(path)
    if suffix in PDF_EXTENSIONS:
        text, title, sections = _read_pdf(path)
        return Document(source, text, title or path.stem, "pdf", digest, sections)
    raw = path.read_bytes()
    text = decode_text(raw, path)
    if suffix in HTML_EXTENSIONS:
        text, title = html_to_text(text)
        return Document(source, text, title or path.stem, "markdown", digest)
    if suffix in MARKDOWN_EXTENSIONS:
        return Document(source, text, _markdown_title(text) or path.stem, "markdown", digest)
    if suffix in PYTHON_EXTENSIONS:
        return Document(source, text, path.name, "python", digest)
    if suffix in CODE_EXTENSIONS:
        return Document(source, text, path.name, "code", digest)
    return Document(source, text, path.stem, "text", digest)


def decode_text(raw: bytes, path: Path | str = "<bytes>") -> str:
    """UTF-8 (BOM allowed), then CP932 for Shift-JIS files from Japanese Windows tools."""
    if b"\x00" in raw[:8192]:
        raise LoaderError(f"{path}: looks binary (NUL bytes); not indexed")
    for encoding in ("utf-8-sig", "cp932"):
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError:
            continue
        return text.replace("\r\n", "\n").replace("\r", "\n")
    raise LoaderError(f"{path}: neither UTF-8 nor CP932 text; not indexed")


_ATX_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$")


def _markdown_title(text: str) -> str:
    for line in text.splitlines():
        match = _ATX_HEADING.match(line)
        if match and len(match.group(1)) == 1:
            return match.group(2).strip()
    return ""


def _read_pdf(path: Path) -> tuple[str, str, tuple[Section, ...]]:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(path)
        if reader.is_encrypted:
            raise LoaderError(f"{path}: encrypted PDF; not indexed")
        pages = [(page.extract_text() or "").strip() for page in reader.pages]
        title = ""
        if reader.metadata is not None and reader.metadata.title:
            title = str(reader.metadata.title).strip()
    except (PdfReadError, ValueError, KeyError, TypeError) as exc:
        raise LoaderError(f"{path}: unreadable PDF ({exc})") from exc
    parts: list[str] = []
    sections: list[Section] = []
    offset = 0
    for number, page_text in enumerate(pages, start=1):
        if not page_text:
            continue
        if parts:
            parts.append("\n\n")
            offset += 2
        sections.append(Section(offset, offset + len(page_text), (f"page {number}",)))
        parts.append(page_text)
        offset += len(page_text)
    return "".join(parts), title, tuple(sections)


class _HTMLText(HTMLParser):
    """Visible text with headings rewritten as markdown ATX lines (so the markdown chunker
    gives HTML documents heading paths) and block elements as paragraph breaks."""

    _SKIP = frozenset({"script", "style", "noscript", "template", "svg", "head"})
    _BLOCK = frozenset(
        {
            "p", "div", "section", "article", "main", "aside", "header", "footer", "nav",
            "ul", "ol", "li", "table", "tr", "blockquote", "pre", "figure", "figcaption",
            "dl", "dt", "dd", "form", "hr", "details", "summary",
        }
    )  # fmt: skip
    _HEADINGS = frozenset({"h1", "h2", "h3", "h4", "h5", "h6"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title_parts: list[str] = []
        self._skip_depth = 0
        self._in_title = False
        self._in_pre = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "title":
            self._in_title = True
        elif tag in self._SKIP:
            self._skip_depth += 1
        elif tag in self._HEADINGS:
            self.parts.append("\n\n" + "#" * int(tag[1]) + " ")
        elif tag == "br":
            self.parts.append("\n")
        elif tag in self._BLOCK:
            self.parts.append("\n\n")
            if tag == "pre":
                self._in_pre += 1
        elif tag in {"td", "th"}:
            self.parts.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
        elif tag in self._SKIP:
            self._skip_depth = max(0, self._skip_depth - 1)
        elif tag in self._HEADINGS or tag in self._BLOCK:
            self.parts.append("\n\n")
            if tag == "pre":
                self._in_pre = max(0, self._in_pre - 1)

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title_parts.append(data)
        elif self._skip_depth == 0:
            if self._in_pre:
                self.parts.append(data.replace("\n", "\u2028"))  # kept through whitespace folding
            else:
                self.parts.append(data)


def html_to_text(html: str) -> tuple[str, str]:
    """(text, title) from HTML using the standard library's tolerant parser."""
    parser = _HTMLText()
    parser.feed(html)
    parser.close()
    raw = "".join(parser.parts)
    lines = []
    for line in raw.split("\n"):
        folded = re.sub(r"[ \t\f\v\u00a0]+", " ", line).strip()
        # A heading marker whose element held no text would otherwise become a bare "#".
        lines.append("" if re.fullmatch(r"#{1,6}", folded) else folded)
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip().replace("\u2028", "\n")
    title = re.sub(r"\s+", " ", "".join(parser.title_parts)).strip()
    if not title:
        title = _markdown_title(text)
    return text, title
