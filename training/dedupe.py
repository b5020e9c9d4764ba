"""Duplicate removal: exact (normalised text hash) and near-duplicate (MinHash LSH).

Repeated boilerplate teaches a model to over-weight it, and a near-copy of a training
paragraph in another document would leak across the train/test split.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

_SPACE = re.compile(r"\s+")
_PUNCT = re.compile(r"[^\w\s]")


def normalise(text: str) -> str:
    """NFKC, case-folded, punctuation dropped, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return _SPACE.sub(" ", _PUNCT.sub(" ", text)).strip()


def text_hash(text: str) -> str:
    return hashlib.sha256(normalise(text).encode()).hexdigest()


def shingles(text: str, size: int = 5) -> set[str]:
    """Character n-grams of the normalised text: works for Japanese, which has no spaces."""
    norm = normalise(text).replace(" ", "")
    if len(norm) <= size:
        return {norm} if norm else set()
    return {norm[i : i + size] for i in range(len(norm) - size + 1)}


@dataclass
class DedupeStats:
    exact: int = 0
    near: int = 0


def remove_exact(items: Sequence[T], key: Callable[[T], str]) -> tuple[list[T], int]:
    """First occurrence of each normalised text wins."""
    seen: set[str] = set()
    kept: list[T] = []
    for item in items:
        digest = text_hash(key(item))
        if digest in seen:
            continue
        seen.add(digest)
        kept.append(item)
    return kept, len(items) - len(kept)


def remove_near(
    items: Sequence[T],
    key: Callable[[T], str],
    threshold: float = 0.8,
    num_perm: int = 128,
    seed: int = 1,
) -> tuple[list[T], int]:
    """Drop items whose estimated Jaccard similarity to an earlier kept item is >= threshold.

    LSH proposes candidates at a looser threshold (few missed pairs); each candidate is then
    confirmed with the exact shingle Jaccard, so estimation noise cannot drop a unique item.
    """
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=max(0.1, threshold - 0.25), num_perm=num_perm)
    kept: list[T] = []
    kept_shingles: dict[str, set[str]] = {}
    for index, item in enumerate(items):
        grams = shingles(key(item))
        if not grams:
            kept.append(item)
            continue
        signature = MinHash(num_perm=num_perm, seed=seed)
        for gram in grams:
            signature.update(gram.encode())
        duplicate = False
        for other in lsh.query(signature):
            other_grams = kept_shingles[other]
            if len(grams & other_grams) / len(grams | other_grams) >= threshold:
                duplicate = True
                break
        if duplicate:
            continue
        name = str(index)
        lsh.insert(name, signature)
        kept_shingles[name] = grams
        kept.append(item)
    return kept, len(items) - len(kept)


def dedupe(
    items: Sequence[T], key: Callable[[T], str], near_threshold: float | None = 0.8
) -> tuple[list[T], DedupeStats]:
    kept, exact = remove_exact(items, key)
    near = 0
    if near_threshold is not None:
        kept, near = remove_near(kept, key, threshold=near_threshold)
    return kept, DedupeStats(exact=exact, near=near)
