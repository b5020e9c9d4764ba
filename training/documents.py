"""Source documents for `ragtune prepare`: files or directories, read as UTF-8 text.

A document's id is its path relative to the source argument it came from, so the id (and
therefore its train/val/test split) is the same on every machine and checkout.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = frozenset({".md", ".markdown", ".txt", ".rst"})
CODE_SUFFIXES = frozenset({".py"})


@dataclass(frozen=True)
class Document:
    id: str
    path: Path
    text: str

    @property
    def title(self) -> str:
        """First Markdown H1, else the file name without suffix, dashes as spaces."""
        match = re.search(r"^#\s+(.+?)\s*#*\s*$", self.text, flags=re.MULTILINE)
        if match:
            return match.group(1).strip()
        return self.path.stem.replace("_", " ").replace("-", " ")


def load_documents(sources: Iterable[str | Path], suffixes: frozenset[str]) -> list[Document]:
    """Every matching file under `sources`, sorted by id; unreadable files are skipped."""
    documents: dict[str, Document] = {}
    for source in sources:
        root = Path(source).expanduser()
        if not root.exists():
            raise FileNotFoundError(f"source not found: {root}")
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            if path.suffix.lower() not in suffixes or any(
                part.startswith(".") for part in path.relative_to(root.parent).parts
            ):
                continue
            doc_id = path.name if root.is_file() else path.relative_to(root).as_posix()
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                logger.warning("skipping %s: %s", path, exc)
                continue
            if doc_id in documents:
                logger.warning("duplicate document id %s (%s); keeping the first", doc_id, path)
                continue
            documents[doc_id] = Document(id=doc_id, path=path, text=text)
    return [documents[key] for key in sorted(documents)]
