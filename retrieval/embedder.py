"""The sentence-transformers embedder shared by index builds, searches and /v1/embeddings.

Only local directories are accepted (the bundled all-MiniLM-L6-v2 by default): the server
runs without network access, so a hub id is an error rather than a download.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.chunking import HFTokenCounter
from retrieval.config import BUNDLED_EMBEDDER

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

_FINGERPRINT_FILES = (
    "modules.json",
    "config.json",
    "sentence_bert_config.json",
    "tokenizer.json",
    "1_Pooling/config.json",
)
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def resolve_embedder_dir(spec: str | Path = BUNDLED_EMBEDDER) -> Path:
    """'bundled' -> the packaged MiniLM directory; anything else must be a local ST directory."""
    if str(spec) == BUNDLED_EMBEDDER:
        from ragtune.models.bundled import bundled_embedder_dir

        return bundled_embedder_dir()
    path = Path(spec).expanduser()
    if not (path / "modules.json").is_file():
        raise FileNotFoundError(
            f"embedder {str(spec)!r} is not a local sentence-transformers directory "
            "(hub ids are not downloaded)"
        )
    return path


def embedder_fingerprint(model_dir: Path) -> str:
    """Identifies the model without hashing all weights: configs, tokenizer, and the size and
    first MiB of the weights file. An index built with another model is refused."""
    digest = hashlib.sha256()
    for name in _FINGERPRINT_FILES:
        path = model_dir / name
        if path.is_file():
            digest.update(name.encode())
            digest.update(path.read_bytes())
    for name in _WEIGHT_FILES:
        path = model_dir / name
        if path.is_file():
            digest.update(f"{name}:{path.stat().st_size}".encode())
            with open(path, "rb") as handle:
                digest.update(handle.read(1 << 20))
    return digest.hexdigest()[:16]


class Embedder:
    """L2-normalised float32 sentence embeddings.

    The model loads on first use. `embed`, `count_tokens` and `token_counter().spans` are
    safe to call from several threads: they are serialised by one lock, because the Hugging
    Face fast tokenizer is not re-entrant ("Already borrowed") and one CPU forward pass
    already uses every torch thread.
    """

    def __init__(
        self, model: str | Path = BUNDLED_EMBEDDER, *, device: str = "cpu", batch_size: int = 32
    ) -> None:
        self.model_dir = resolve_embedder_dir(model)
        self.name = "all-MiniLM-L6-v2" if str(model) == BUNDLED_EMBEDDER else self.model_dir.name
        self.device = device
        self.batch_size = batch_size
        self.fingerprint = embedder_fingerprint(self.model_dir)
        self._model: SentenceTransformer | None = None
        self._lock = threading.RLock()

    def _load(self) -> SentenceTransformer:
        with self._lock:
            if self._model is None:
                from sentence_transformers import SentenceTransformer

                logger.info("loading embedder %s from %s", self.name, self.model_dir)
                self._model = SentenceTransformer(
                    str(self.model_dir), device=self.device, local_files_only=True
                )
                self._model.eval()
            return self._model

    @property
    def dim(self) -> int:
        model = self._load()
        getter = getattr(model, "get_embedding_dimension", None)  # sentence-transformers >= 5
        if getter is None:
            getter = model.get_sentence_embedding_dimension
        return int(getter())

    @property
    def max_tokens(self) -> int:
        """Longest input in tokens; longer texts are truncated by the model."""
        return int(self._load().max_seq_length)

    def embed(
        self, texts: Sequence[str], *, batch_size: int | None = None, progress: bool = False
    ) -> np.ndarray:
        """Shape (len(texts), dim), float32, each row of unit L2 norm."""
        if isinstance(texts, str):
            raise TypeError("embed() takes a sequence of strings, not a string")
        model = self._load()
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:
            vectors = model.encode(
                list(texts),
                batch_size=batch_size or self.batch_size,
                show_progress_bar=progress,
                convert_to_numpy=True,
                normalize_embeddings=True,
            )
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens per text including [CLS]/[SEP], before truncation (for usage reporting)."""
        tokenizer = self._load().tokenizer
        with self._lock:
            encoded = tokenizer(list(texts), add_special_tokens=True, verbose=False)
        return [len(ids) for ids in encoded["input_ids"]]

    def token_counter(self) -> HFTokenCounter:
        """The tokenizer the chunker counts with, so chunks fit the model window."""
        tokenizer = self._load().tokenizer
        return HFTokenCounter(tokenizer, name=f"{self.name}:{self.fingerprint}", lock=self._lock)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "fingerprint": self.fingerprint, "dim": self.dim}
