"""Document ingestion, hybrid (dense + BM25) search and RAG prompt formatting.

Attributes are imported lazily so that `ragtune --help` (which imports `retrieval.cli`)
does not pay for numpy, faiss or torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "RetrievalConfig": "retrieval.config",
    "RetrievalError": "retrieval.errors",
    "InvalidIndexNameError": "retrieval.errors",
    "IndexNotFoundError": "retrieval.errors",
    "IndexUnavailableError": "retrieval.errors",
    "LoaderError": "retrieval.errors",
    "Embedder": "retrieval.embedder",
    "Document": "retrieval.loaders",
    "load_file": "retrieval.loaders",
    "Index": "retrieval.index",
    "IndexStore": "retrieval.store",
    "IndexInfo": "retrieval.generation",
    "BuildReport": "retrieval.ingest",
    "SearchHit": "retrieval.index",
    "validate_index_name": "retrieval.store",
    "format_rag_prompt": "retrieval.prompt",
    "RAG_PROMPT_TEMPLATE": "retrieval.prompt",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'retrieval' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
