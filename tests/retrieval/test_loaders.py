from __future__ import annotations

from pathlib import Path

import pytest

from retrieval.errors import LoaderError
from retrieval.loaders import iter_source_files, load_file
from tests.retrieval.conftest import make_pdf

CASES = [
    # (file name, content, kind, title, text that must appear, text that must not)
    (
        "notes.txt",
        "Plain text body.\n\nSecond paragraph.",
        "text",
        "notes",
        "Second paragraph",
        None,
    ),
    ("guide.md", "# Guide\n\n## Setup\n\nRun make.", "markdown", "Guide", "## Setup", None),
    (
        "page.html",
        "<html><head><title>Intranet</title><script>alert('x')</script></head>"
        "<body><h2>News &amp; events</h2><p>Hello <b>world</b></p></body></html>",
        "markdown",
        "Intranet",
        "## News & events\n\nHello world",
        "alert",
    ),
    ("tool.py", "def f():\n    return 1\n", "python", "tool.py", "def f()", None),
    ("main.go", "package main\n\nfunc main() {}\n", "code", "main.go", "func main", None),
    ("README", "no extension but text", "text", "README", "no extension", None),
]


@pytest.mark.parametrize(("name", "content", "kind", "title", "present", "absent"), CASES)
def test_text_loaders(tmp_path: Path, name, content, kind, title, present, absent) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    doc = load_file(path)
    assert doc.kind == kind
    assert doc.title == title
    assert present in doc.text
    if absent:
        assert absent not in doc.text
    assert doc.source == str(path.resolve())
    assert len(doc.doc_hash) == 64


def test_pdf_loader_pages_become_sections(tmp_path: Path) -> None:
    path = tmp_path / "report.pdf"
    path.write_bytes(make_pdf(["First page text.", "Second page text."], title="Q3 Report"))
    doc = load_file(path)
    assert doc.kind == "pdf"
    assert doc.title == "Q3 Report"
    assert [s.heading for s in doc.sections] == [("page 1",), ("page 2",)]
    assert [doc.text[s.start : s.end] for s in doc.sections] == [
        "First page text.",
        "Second page text.",
    ]


def test_broken_pdf_raises_loader_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.pdf"
    path.write_bytes(b"%PDF-1.4\nthis is not really a pdf")
    with pytest.raises(LoaderError):
        load_file(path)


def test_binary_file_raises_loader_error(tmp_path: Path) -> None:
    path = tmp_path / "blob.txt"
    path.write_bytes(b"\x00\x01\x02binary")
    with pytest.raises(LoaderError, match="binary"):
        load_file(path)


def test_shift_jis_text_is_decoded(tmp_path: Path) -> None:
    path = tmp_path / "sjis.txt"
    path.write_bytes("経費精算の手順".encode("cp932"))
    assert load_file(path).text == "経費精算の手順"


def test_directory_walk_skips_hidden_and_unsupported(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# A", encoding="utf-8")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config.txt").write_text("x", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.py").write_text("x = 1", encoding="utf-8")
    found = sorted(p.name for p in iter_source_files([tmp_path, tmp_path / "a.md"]))
    assert found == ["a.md", "b.py"]


def test_missing_source_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        list(iter_source_files([tmp_path / "nope"]))
