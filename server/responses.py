"""OpenAI response and stream-chunk models for /v1/chat/completions and /v1/completions,
logprobs included. No serving logic lives here."""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, Field

from server.protocol import Source


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


# ------------------------------------------------------------------------------------ logprobs
class ChatLogprob(BaseModel):
    """One token in OpenAI's chat logprobs: its text, log-probability and UTF-8 bytes (a token
    may hold part of a character; its bytes are exact, its text then shows U+FFFD)."""

    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobContent(ChatLogprob):
    top_logprobs: list[ChatLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatLogprobContent] | None = None


class CompletionLogprobs(BaseModel):
    """vLLM's `CompletionLogProbs`: parallel lists, one entry per token. `text_offset` is the
    character offset of each token in the choice's text; `top_logprobs[i]` maps token text to
    logprob for the chosen token and the `logprobs` most likely ones. A token's logprob is None
    where it has none (the first prompt token, once echo is supported)."""

    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


# ---------------------------------------------------------------------------------------- chat
class ToolCallFunction(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class DeltaToolCall(ToolCall):
    index: int  # the call's place in the message's tool_calls


class ChatChoice(BaseModel):
    index: int = 0
    message: ResponseMessage
    finish_reason: str | None
    logprobs: ChatChoiceLogprobs | None = None


class PromptLogprob(BaseModel):
    """vLLM's `Logprob`, as its chat `prompt_logprobs` entries hold them."""

    logprob: float
    rank: int | None = None
    decoded_token: str


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage
    sources: list[Source] | None = None
    # vLLM's extension (request `prompt_logprobs`): per prompt token, None for the first,
    # else token id -> its logprob for the token itself and its top alternatives
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: str | None = None
    logprobs: ChatChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    sources: list[Source] | None = None


# --------------------------------------------------------------------------------- completions
class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None
    sources: list[Source] | None = None
