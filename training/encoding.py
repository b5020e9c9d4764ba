"""Chat examples -> token ids and labels, with the loss on assistant tokens only.

The text comes from `ragtune.models.chat.render_chat`, the function the server uses, so an
adapter is trained on exactly the prompt format it is served with. Assistant spans are found
by rendering each conversation prefix; tokens are labelled through the tokenizer's character
offsets, so the labels follow the real (joint) tokenization of the full text.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ragtune.models.chat import render_chat

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass
class EncodedExample:
    input_ids: list[int]
    labels: list[int]

    def as_features(self) -> dict[str, list[int]]:
        return {"input_ids": self.input_ids, "labels": self.labels}


def assistant_spans(tokenizer: Any, messages: Sequence[dict[str, str]]) -> tuple[str, list]:
    """Full rendered text and the (start, end) character spans of every assistant reply,
    including its end-of-turn marker so the adapter learns where to stop."""
    full = render_chat(tokenizer, messages, add_generation_prompt=False)
    spans: list[tuple[int, int]] = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render_chat(tokenizer, messages[:index], add_generation_prompt=True)
        through = render_chat(tokenizer, messages[: index + 1], add_generation_prompt=False)
        if not (full.startswith(through) and through.startswith(prefix)):
            raise ValueError("chat template is not prefix-stable; cannot locate assistant turns")
        spans.append((len(prefix), len(through.rstrip("\n"))))
    return full, spans


def encode_chat(
    tokenizer: Any, messages: Sequence[dict[str, str]], max_len: int
) -> EncodedExample | None:
    """None when truncation to `max_len` leaves no assistant token to learn from."""
    text, spans = assistant_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = []
    for token_id, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True):
        inside = any(
            start < span_end and end > span_start and start >= span_start
            for span_start, span_end in spans
        )
        labels.append(token_id if inside else IGNORE_INDEX)
    input_ids = list(encoded["input_ids"][:max_len])
    labels = labels[:max_len]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return EncodedExample(input_ids=input_ids, labels=labels)


def encode_rows(
    tokenizer: Any, rows: Sequence[dict[str, Any]], max_len: int
) -> list[dict[str, list[int]]]:
    features = []
    dropped = 0
    for row in rows:
        example = encode_chat(tokenizer, row["messages"], max_len)
        if example is None:
            dropped += 1
            continue
        features.append(example.as_features())
    if dropped:
        logger.warning(
            "dropped %d examples with no assistant tokens within %d tokens", dropped, max_len
        )
    return features


class PadCollator:
    """Right-pads a batch to its longest example; padded labels are ignored by the loss."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        width = max(len(item["input_ids"]) for item in batch)
        ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, item in enumerate(batch):
            length = len(item["input_ids"])
            ids[row, :length] = torch.tensor(item["input_ids"])
            labels[row, :length] = torch.tensor(item["labels"])
            mask[row, :length] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
