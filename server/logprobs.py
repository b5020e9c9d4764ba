"""Engine logprobs (token ids and floats) as OpenAI's chat `logprobs.content` entries or vLLM's
completions `CompletionLogProbs`.

Token text comes from the token's own bytes: for byte-level BPE (GPT-2, SmolLM2, Llama 3) the
vocabulary entry maps back to exact UTF-8 bytes, so a token holding half of a character still
reports its true bytes (its text shows U+FFFD, as vLLM's). Texts are cached per token id.
"""

from __future__ import annotations

import re
from typing import Any

from server.choices import ChoiceResult, Echo
from server.engine.types import TokenLogprobs
from server.responses import ChatLogprob, ChatLogprobContent, CompletionLogprobs, PromptLogprob

# JSON has no -inf; OpenAI and vLLM clamp to this
MIN_LOGPROB = -9999.0
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")  # SentencePiece byte fallback


def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable-character alphabet for the 256 byte values, inverted."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


class TokenTexts:
    """Token id -> (text, UTF-8 bytes) for one tokenizer."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        decoder = getattr(backend, "decoder", None)
        self._byte_level = "ByteLevel" in repr(decoder)
        self._bytes = _byte_decoder()
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        self._added = {int(i): str(getattr(t, "content", t)) for i, t in added.items()}
        self._cache: dict[int, tuple[str, bytes]] = {}

    def get(self, token_id: int) -> tuple[str, bytes]:
        found = self._cache.get(token_id)
        if found is None:
            raw = self._raw_bytes(token_id)
            found = self._cache[token_id] = (raw.decode("utf-8", errors="replace"), raw)
        return found

    def text(self, token_id: int) -> str:
        return self.get(token_id)[0]

    def _raw_bytes(self, token_id: int) -> bytes:
        if token_id in self._added:
            return self._added[token_id].encode()
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        if not isinstance(piece, str):
            return self._tokenizer.decode([token_id]).encode()
        if self._byte_level and all(c in self._bytes for c in piece):
            return bytes(self._bytes[c] for c in piece)
        if match := _BYTE_PIECE.match(piece):
            return bytes([int(match[1], 16)])
        return piece.replace("▁", " ").encode()


def _clamp(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


def chat_content(entries: list[TokenLogprobs], texts: TokenTexts) -> list[ChatLogprobContent]:
    """OpenAI's `choices[].logprobs.content`: each token with its top alternatives."""

    def item(token_id: int, logprob: float) -> ChatLogprob:
        text, raw = texts.get(token_id)
        return ChatLogprob(token=text, logprob=_clamp(logprob), bytes=list(raw))

    content = []
    for entry in entries:
        chosen = item(entry.token_id, entry.logprob)
        top = [item(token_id, logprob) for token_id, logprob in entry.top]
        content.append(ChatLogprobContent(**chosen.model_dump(), top_logprobs=top))
    return content


def completion_logprobs(
    entries: list[TokenLogprobs | None],
    texts: TokenTexts,
    text_offset: int = 0,
    token_ids: list[int] | None = None,  # the tokens, where an entry may be None (prompt)
    out: CompletionLogprobs | None = None,  # appended to
) -> CompletionLogprobs:
    """vLLM's `CompletionLogProbs`; `text_offset` is where the first token starts in the
    choice's text. Each `top_logprobs` dict holds the chosen token first, then the top k
    (vLLM's shape). An entry None (the first prompt token: nothing predicts it) has logprob
    and top_logprobs None."""
    out = out or CompletionLogprobs()
    for i, entry in enumerate(entries):
        token_id = entry.token_id if entry is not None else token_ids[i]
        text = texts.text(token_id)
        out.tokens.append(text)
        out.text_offset.append(text_offset)
        text_offset += len(text)
        if entry is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        top = {text: _clamp(entry.logprob)}
        for other, logprob in entry.top:
            top.setdefault(texts.text(other), _clamp(logprob))
        out.token_logprobs.append(_clamp(entry.logprob))
        out.top_logprobs.append(top)
    return out


def choice_logprobs(
    texts: TokenTexts, result: ChoiceResult, echo: Echo | None
) -> CompletionLogprobs:
    """A whole completion choice's logprobs: the echoed prompt's tokens (when echoed) and the
    generated ones, offsets running through the choice's text."""
    out = CompletionLogprobs()
    offset = 0
    if echo is not None:
        prompt = result.prompt_logprobs or [None] * len(echo.token_ids)
        completion_logprobs(prompt, texts, 0, echo.token_ids, out)
        offset = len(echo.text)
    return completion_logprobs(result.logprobs, texts, offset, out=out)


def prompt_logprobs(
    entries: list[TokenLogprobs | None], texts: TokenTexts
) -> list[dict[str, PromptLogprob] | None]:
    """vLLM's chat `prompt_logprobs`: per prompt token None (the first) or {token id: its
    logprob, rank and text} for the token itself and then its top alternatives."""
    out: list[dict[str, PromptLogprob] | None] = []
    for entry in entries:
        if entry is None:
            out.append(None)
            continue
        found = {
            str(entry.token_id): PromptLogprob(
                logprob=_clamp(entry.logprob),
                rank=entry.rank,
                decoded_token=texts.text(entry.token_id),
            )
        }
        for rank, (other, logprob) in enumerate(entry.top, start=1):
            found.setdefault(
                str(other),
                PromptLogprob(logprob=_clamp(logprob), rank=rank, decoded_token=texts.text(other)),
            )
        out.append(found)
    return out
