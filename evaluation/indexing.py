"""Index a dataset's own contexts (`--build-index`, the PubMedQA preset) with the project's
retrieval store, each context one in-memory document whose source is its gold doc id, so
the server's `sources[].source` can be matched to `gold_doc_ids` exactly."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from evaluation.dataset import QAItem, context_documents

logger = logging.getLogger(__name__)


def index_root(config: str | None, override: Path | None) -> Path:
    """--index-root, else the configured retrieval.root (default $RAGTUNE_HOME/indexes)."""
    if override is not None:
        return override
    from ragtune.config import load_settings

    settings = load_settings(config)
    return settings.retrieval.resolve_root(settings.home)


def build_context_index(
    items: list[QAItem], name: str, root: Path, config: str | None = None, progress: bool = True
) -> dict[str, Any]:
    """Create or replace index `name` under `root` from the items' contexts, with the
    configured retrieval settings (the server must embed queries the same way)."""
    from ragtune.config import load_settings
    from retrieval.loaders import Document
    from retrieval.store import IndexStore

    documents = [
        Document.from_text(doc_id, text, title=title)
        for doc_id, title, text in context_documents(items)
    ]
    if not documents:
        raise ValueError("--build-index: no question in the dataset has a 'context'")
    settings = load_settings(config).retrieval.model_copy(update={"root": root})
    store = IndexStore(root, config=settings)
    report = store.build_documents(name, documents, progress=progress)
    logger.info(
        "index %s: %d documents, %d chunks in %.1fs",
        name,
        report.documents,
        report.chunks,
        report.seconds,
    )
    return {
        "name": name,
        "root": str(root),
        "documents": report.documents,
        "chunks": report.chunks,
        "build_seconds": round(report.seconds, 1),
    }
