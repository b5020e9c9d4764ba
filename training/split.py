"""Deterministic train/val/test split by document: every example of a document lands in the
same split, so nothing a model is evaluated on leaked into its training data.

The split of a document depends only on a hash of its id (and the seed), not on the rest of
the corpus, so adding documents never moves existing ones between splits.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def document_position(doc_id: str, seed: int = 0) -> float:
    """Uniform number in [0, 1) from sha256(seed:doc_id)."""
    digest = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_split(doc_id: str, val_ratio: float, test_ratio: float, seed: int = 0) -> str:
    position = document_position(doc_id, seed)
    if position < test_ratio:
        return "test"
    if position < test_ratio + val_ratio:
        return "val"
    return "train"


def split_documents(
    doc_ids: Iterable[str], val_ratio: float = 0.1, test_ratio: float = 0.1, seed: int = 0
) -> dict[str, str]:
    """doc id -> split. A small corpus whose hashes left val empty gets one train document
    moved there (the one closest to the val range), so training can still evaluate."""
    if val_ratio < 0 or test_ratio < 0 or val_ratio + test_ratio >= 1:
        raise ValueError("val and test ratios must be >= 0 and sum to less than 1")
    ids = sorted(set(doc_ids))
    assignment = {doc_id: assign_split(doc_id, val_ratio, test_ratio, seed) for doc_id in ids}
    train = [doc_id for doc_id in ids if assignment[doc_id] == "train"]
    if val_ratio > 0 and "val" not in assignment.values() and len(train) >= 2:
        moved = min(train, key=lambda doc_id: document_position(doc_id, seed))
        assignment[moved] = "val"
        logger.warning("no document hashed into val; moved %s there", moved)
    return assignment
