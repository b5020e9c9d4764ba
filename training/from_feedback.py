"""`ragtune prepare --from-feedback`: rated chat completions -> a prepared dataset.

Only what `feedback.store_conversations` kept can become training data (ratings alone carry
no text). A response becomes one example, its conversation's messages followed by:
- the rating's correction, when one was kept (whatever the rating: it is the better answer);
- else the rated answer, when the rating is `up`;
- nothing when the rating is `down` without a correction.

The examples are PII masked again (the server masked them before writing; masking twice
changes nothing), de-duplicated among themselves and against the examples of existing
prepared datasets (`--against`, exact and near-duplicate on the example's whole text, so a
corrected answer to a question already in the data is kept), and split as `ragtune prepare`
splits documents: each response is its own document (`feedback:<response id>`).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ragtune.feedback_store import FeedbackStore
from training.dataset import SPLIT_FILES, read_split, write_split_dataset
from training.dedupe import remove_exact, remove_near, text_hash
from training.pii import mask_pii
from training.records import Example

logger = logging.getLogger(__name__)

RECIPE = "feedback"
ROLES = ("system", "user", "assistant")  # conversations with tool turns are left out


@dataclass
class FeedbackOptions:
    feedback_dir: Path
    out: Path
    against: list[Path] = field(default_factory=list)  # prepared datasets not to repeat
    retention_days: int = 30
    val_ratio: float = 0.1
    test_ratio: float = 0.1
    seed: int = 0
    near_duplicate_threshold: float | None = 0.8


def feedback_examples(store: FeedbackStore, stats: Counter[str]) -> list[Example]:
    """One example per usable rating (the latest rating of a response wins)."""
    conversations = {record["id"]: record for record in store.read("conversations")}
    ratings = {record["id"]: record for record in store.read("ratings")}
    stats["conversations"] = len(conversations)
    stats["ratings"] = len(ratings)
    examples = []
    for response_id, rating in ratings.items():
        conversation = conversations.get(response_id)
        if conversation is None:
            stats["skipped_without_conversation"] += 1
            continue
        messages = [
            {"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]}
            for m in conversation.get("messages", [])
        ]
        if not messages or any(m["role"] not in ROLES for m in messages):
            stats["skipped_tool_or_empty_conversation"] += 1
            continue
        answers = conversation.get("answers", [])
        choice = rating.get("choice", 0)
        if rating.get("correction"):
            answer = rating["correction"]
            stats["from_corrections"] += 1
        elif rating.get("rating") == "up" and choice < len(answers) and answers[choice].strip():
            answer = answers[choice]
            stats["from_up_ratings"] += 1
        else:
            stats["skipped_down_without_correction"] += 1
            continue
        messages.append({"role": "assistant", "content": answer})
        examples.append(Example(doc_id=f"feedback:{response_id}", recipe=RECIPE, messages=messages))
    return examples


def prepare_from_feedback(options: FeedbackOptions) -> dict[str, Any]:
    """Write train/val/test JSONL and stats.json to `options.out` (atomically); return stats."""
    store = FeedbackStore(options.feedback_dir, options.retention_days)
    stats: Counter[str] = Counter()
    examples = feedback_examples(store, stats)
    pii: Counter[str] = Counter()
    for example in examples:
        for message in example.messages:
            result = mask_pii(message["content"])
            message["content"] = result.text
            pii.update(result.counts)

    examples, exact_within = remove_exact(examples, key=lambda example: example.text)
    existing = [
        row
        for directory in options.against
        for split in SPLIT_FILES
        for row in read_split(directory, split)
    ]
    existing_texts = ["\n".join(m["content"] for m in row["messages"]) for row in existing]
    known = {text_hash(text) for text in existing_texts}
    kept = [example for example in examples if text_hash(example.text) not in known]
    exact_against = len(examples) - len(kept)
    near = 0
    if options.near_duplicate_threshold is not None and kept:
        # existing texts first: remove_near keeps the first of near-copies
        pool: list[Example | str] = [*existing_texts, *kept]
        survivors, _ = remove_near(
            pool,
            key=lambda item: item if isinstance(item, str) else item.text,
            threshold=options.near_duplicate_threshold,
        )
        survived = {id(item) for item in survivors}
        near = sum(id(example) not in survived for example in kept)
        kept = [example for example in kept if id(example) in survived]
    if not kept:
        raise ValueError(
            f"no training examples in {options.feedback_dir}: {dict(sorted(stats.items()))} "
            "(only corrections and up-rated answers of conversations kept with "
            "feedback.store_conversations on can be used)"
        )

    summary = write_split_dataset(
        options.out,
        kept,
        val_ratio=options.val_ratio,
        test_ratio=options.test_ratio,
        seed=options.seed,
        summarize=lambda by_split, assignment: {
            "recipe": RECIPE,
            "sources": [str(options.feedback_dir)],
            "against": [str(directory) for directory in options.against],
            "feedback": dict(sorted(stats.items())),
            "examples_removed_exact_duplicates": exact_within,
            "examples_removed_existing_duplicates": exact_against,
            "examples_removed_near_duplicates": near,
            "pii_masked": dict(sorted(pii.items())),
            "retention_days": options.retention_days,
        },
    )
    logger.info("prepared %d examples from feedback in %s", len(kept), options.out)
    return summary
