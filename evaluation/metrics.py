"""Answer and retrieval metrics that need no LLM judge.

Exact match and token F1 follow the SQuAD v1.1 evaluation script (lower-case, drop
punctuation and the articles a/an/the, collapse whitespace; best score over the references).
ROUGE-L tokenises like the `rouge-score` package without stemming (lower-case alphanumeric
runs) so its numbers line up with published ones. Japanese and Chinese text has no spaces:
each of its characters is a token in both (character-level F1, as MLQA scores Chinese),
and its punctuation (。、「」) is dropped like ASCII punctuation. Groundedness and
recall@k are per answer; `None` means "not applicable" (no retrieval, no gold documents),
never zero.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from pathlib import PurePath

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_ROUGE_TOKEN = re.compile(r"[a-z0-9]+")
_CITATION = re.compile(r"\[\d+(?:\s*[,-]\s*\d+)*\]")
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uff66-\uff9f"
_CJK_CHAR = re.compile(f"[{_CJK}]")
_CJK_SPLIT = re.compile(f"([{_CJK}])")
_CJK_PUNCTUATION = str.maketrans("", "", "。、，．・「」『』（）【】〔〕！？：；…")
_ROUGE_TOKEN_CJK = re.compile(f"[a-z0-9]+|[{_CJK}]")

# Function words carry no claim; counting them would make any fluent answer look grounded.
_STOPWORD_TEXT = """
a an the and or but if then than of to in on at by for with from as into about over
is are was were be been being am do does did done have has had having it its this
that these those there here which who whom whose what when where why how i you he
she we they me him her us them my your his our their not no yes so such can could
may might will would shall should must also just very more most some any all each
both other only own same too s t
"""
STOPWORDS = frozenset(_STOPWORD_TEXT.split())


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_PUNCTUATION).translate(_CJK_PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def squad_tokens(text: str) -> list[str]:
    """Normalised whitespace tokens; Japanese/Chinese runs cut into single characters."""
    tokens = normalize_answer(text).split()
    if not any(_CJK_CHAR.search(token) for token in tokens):
        return tokens
    return [part for token in tokens for part in _CJK_SPLIT.split(token) if part]


def exact_match(prediction: str, references: Sequence[str]) -> float | None:
    """1.0 if the normalised prediction equals any normalised reference."""
    if not references:
        return None
    predicted = normalize_answer(prediction)
    return float(any(predicted == normalize_answer(ref) for ref in references))


def _f1(predicted: list[str], expected: list[str]) -> float:
    if not predicted or not expected:
        return float(predicted == expected)  # SQuAD v2: both empty counts as a match
    common = sum((Counter(predicted) & Counter(expected)).values())
    if not common:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, references: Sequence[str]) -> float | None:
    """SQuAD token F1 (bag of normalised tokens), best over the references."""
    if not references:
        return None
    predicted = squad_tokens(prediction)
    return max(_f1(predicted, squad_tokens(ref)) for ref in references)


def rouge_tokens(text: str) -> list[str]:
    pattern = _ROUGE_TOKEN_CJK if _CJK_CHAR.search(text) else _ROUGE_TOKEN
    return pattern.findall(text.lower())


def keyword_hit(prediction: str, keywords: Sequence[str]) -> float | None:
    """1.0 if any keyword (the fact a right answer must state: "Keystone", "4410") occurs in
    the answer, case-insensitively (as `training.evaluate` scores the demo questions)."""
    if not keywords:
        return None
    lowered = prediction.lower()
    return float(any(keyword.lower() in lowered for keyword in keywords))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Longest common subsequence by dynamic programming, one row of memory."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, references: Sequence[str]) -> float | None:
    """ROUGE-L F-measure (beta = 1) on the longest common subsequence, best reference."""
    if not references:
        return None
    predicted = rouge_tokens(prediction)
    best = 0.0
    for reference in references:
        expected = rouge_tokens(reference)
        if not predicted or not expected:
            continue
        lcs = lcs_length(predicted, expected)
        if lcs:
            precision, recall = lcs / len(predicted), lcs / len(expected)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def content_tokens(text: str) -> list[str]:
    """Normalised tokens without citation markers ([1], [2, 3]) and stop words."""
    return [t for t in squad_tokens(_CITATION.sub(" ", text)) if t not in STOPWORDS]


def groundedness(answer: str, retrieved: Sequence[str]) -> float | None:
    """Share of the answer's content tokens that occur in the retrieved text: a cheap,
    judge-free proxy for "the answer says what the sources say" (it cannot see negation
    or paraphrase). None without retrieved text or without content tokens."""
    if not retrieved:
        return None
    tokens = content_tokens(answer)
    if not tokens:
        return None
    support = set(squad_tokens(" ".join(retrieved)))
    return sum(token in support for token in tokens) / len(tokens)


def source_matches(source: str, gold_id: str) -> bool:
    """A server `sources[].source` names a gold document: the in-memory id itself, or a
    file path whose name or stem is the id."""
    if source == gold_id:
        return True
    path = PurePath(source)
    return gold_id in (path.name, path.stem, str(path))


def ranked_documents(sources: Sequence[str]) -> list[str]:
    """Chunk sources collapsed to distinct documents, in rank order."""
    seen: list[str] = []
    for source in sources:
        if source not in seen:
            seen.append(source)
    return seen


def recall_at_k(sources: Sequence[str], gold_ids: Sequence[str], k: int) -> float | None:
    """Share of the gold documents among the first k retrieved chunks' documents."""
    if not gold_ids:
        return None
    top = ranked_documents(sources[:k])
    found = sum(any(source_matches(s, gold) for s in top) for gold in gold_ids)
    return found / len(gold_ids)


def reciprocal_rank(sources: Sequence[str], gold_ids: Sequence[str]) -> float | None:
    """1 / rank of the first retrieved document that is gold (0 when none is)."""
    if not gold_ids:
        return None
    for rank, source in enumerate(ranked_documents(sources), start=1):
        if any(source_matches(source, gold) for gold in gold_ids):
            return 1.0 / rank
    return 0.0
