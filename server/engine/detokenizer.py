"""Incremental detokenization that never emits half a character.

Byte-level BPE splits multi-byte UTF-8 characters (Japanese, emoji) across tokens; decoding a
partial character yields U+FFFD. Text is released only once the decoded window no longer ends
in U+FFFD (the approach vLLM uses), so a stream never shows broken characters.
"""

from __future__ import annotations

from typing import Any

# Prompt tokens kept as left context so tokenizers that strip a leading space decode correctly.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: list[int]):
        self._tokenizer = tokenizer
        self._ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add one token; return the newly complete text (possibly empty)."""
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return full[len(prefix) :]
