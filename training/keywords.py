"""Keyword extraction (TF-IDF over the corpus's chunks) for the keyword and template-QA
recipes. English words and Japanese katakana/kanji runs, no external tokenizer needed."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

_EN_WORD = re.compile(r"[A-Za-z][A-Za-z0-9'-]*[A-Za-z0-9]|[A-Z]{2,}-?\d+")
_JA_TERM = re.compile(r"[\u30a0-\u30ff]{2,}|[\u3400-\u4dbf\u4e00-\u9fff]{2,}")

_STOPWORD_TEXT = """a about above after again against all also am an and any are as at be because
been before being below between both but by can could did do does doing down during each either
every few for from further had has have having he her here hers him his how i if in into is it
its itself just may me might more most must my no nor not now of off on once one only or other
our ours out over own per same shall she should so some such than that the their them then there
these they this those through to too under until up upon us very via was we were what when where
which while who whom why will with within without would you your yours new use used using get"""
STOPWORDS = frozenset(_STOPWORD_TEXT.split())


def terms(text: str) -> list[str]:
    """Candidate keywords in order of appearance (English lower-cased, stopwords removed)."""
    found: list[tuple[int, str]] = []
    for match in _EN_WORD.finditer(text):
        word = match.group()
        if len(word) >= 3 and word.lower() not in STOPWORDS:
            found.append((match.start(), word if word.isupper() else word.lower()))
    for match in _JA_TERM.finditer(text):
        found.append((match.start(), match.group()))
    return [term for _, term in sorted(found)]


class KeywordIndex:
    """Document frequencies over a corpus of chunks, for TF-IDF keyword ranking."""

    def __init__(self, texts: Sequence[str]) -> None:
        self.count = len(texts)
        self.df: Counter[str] = Counter()
        for text in texts:
            self.df.update(set(terms(text)))

    def keywords(self, text: str, k: int = 5) -> list[str]:
        """Top-k terms by tf * idf; ties broken by first appearance, so output is stable."""
        found = terms(text)
        tf = Counter(found)
        first = {term: index for index, term in reversed(list(enumerate(found)))}

        def score(term: str) -> tuple[float, int]:
            idf = math.log((1 + self.count) / (1 + self.df.get(term, 0))) + 1
            return (-tf[term] * idf * (1 + 0.05 * min(len(term), 12)), first[term])

        return sorted(tf, key=score)[:k]
