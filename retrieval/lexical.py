"""BM25 (bm25s) over a tokenizer that treats Japanese/CJK text as character n-grams.

CJK text has no spaces, so a word tokenizer would see a whole sentence as one token and
no query would ever match. We index overlapping character bigrams of every CJK run plus
unigrams of kanji/katakana (not hiragana, which is mostly particles), the approach of
Lucene's CJK analyzer. Latin text is lower-cased NFKC words minus English stop words;
identifiers such as ``max_batch_tokens`` or ``ERR-4471`` are kept whole *and* split.
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

_CJK = r"\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_HIRAGANA = re.compile(r"[\u3040-\u309f]")
_TOKEN = re.compile(
    rf"(?P<cjk>[{_CJK}]+)"
    rf"|(?P<ident>(?:(?![{_CJK}])[^\W_])+(?:[-_.](?:(?![{_CJK}])[^\W_])+)+)"
    rf"|(?P<word>(?:(?![{_CJK}])[^\W_])+)"
)
_PARTS = re.compile(r"[-_.]")
_STOP_WORDS_TEXT = """a an and are as at be been but by can could did do does for from had has
have how i if in into is it its of on or that the their then there these they this to was were
what when where which who why will with would you your"""
STOP_WORDS = frozenset(_STOP_WORDS_TEXT.split())
LEXICAL_TOKENIZER = "nfkc-lower-cjk-bigram-v1"


def lexical_tokens(text: str) -> list[str]:
    """The BM25 terms of `text` (same function for documents and queries)."""
    normalized = unicodedata.normalize("NFKC", text).lower()
    tokens: list[str] = []
    for match in _TOKEN.finditer(normalized):
        if match.group("cjk"):
            run = match.group("cjk")
            tokens.extend(run[i : i + 2] for i in range(len(run) - 1))
            tokens.extend(char for char in run if not _HIRAGANA.match(char))
            if len(run) == 1 and _HIRAGANA.match(run):
                tokens.append(run)
        elif match.group("ident"):
            ident = match.group("ident")
            tokens.append(ident)
            tokens.extend(part for part in _PARTS.split(ident) if part not in STOP_WORDS)
        else:
            word = match.group("word")
            if word not in STOP_WORDS:
                tokens.append(word)
    return tokens


class LexicalIndex:
    """A BM25 index over chunk texts. Read-only after build/load, so concurrent `scores`
    calls are safe (they only read numpy arrays)."""

    def __init__(self, bm25: object, size: int) -> None:
        self._bm25 = bm25
        self.size = size

    @classmethod
    def build(cls, texts: Sequence[str], *, progress: bool = False) -> LexicalIndex:
        import bm25s

        corpus = [lexical_tokens(text) for text in texts]
        bm25 = bm25s.BM25()
        bm25.index(corpus, show_progress=progress)
        return cls(bm25, len(texts))

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._bm25.save(str(directory), allow_pickle=False, show_progress=False)  # type: ignore[attr-defined]
        (directory / "ragtune_lexical.json").write_text(
            json.dumps({"tokenizer": LEXICAL_TOKENIZER, "size": self.size}), encoding="utf-8"
        )

    @classmethod
    def load(cls, directory: Path) -> LexicalIndex:
        import bm25s

        meta = json.loads((directory / "ragtune_lexical.json").read_text(encoding="utf-8"))
        if meta.get("tokenizer") != LEXICAL_TOKENIZER:
            raise ValueError(f"lexical tokenizer {meta.get('tokenizer')!r} is not supported")
        bm25 = bm25s.BM25.load(str(directory), allow_pickle=False, show_progress=False)
        return cls(bm25, int(meta["size"]))

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every chunk for `query` (0 where no term matches)."""
        terms = [term for term in lexical_tokens(query) if term in self._bm25.vocab_dict]  # type: ignore[attr-defined]
        if not terms:
            return np.zeros(self.size, dtype=np.float32)
        return np.asarray(self._bm25.get_scores(terms), dtype=np.float32)  # type: ignore[attr-defined]

    def search(self, query: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices, scores) of the best `k` chunks with a positive score, best first."""
        return top_k_positive(self.scores(query), k)


def top_k_positive(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    positive = np.flatnonzero(scores > 0)
    if positive.size > k:
        positive = positive[np.argpartition(-scores[positive], k - 1)[:k]]
    order = positive[np.argsort(-scores[positive], kind="stable")]
    return order, scores[order]
