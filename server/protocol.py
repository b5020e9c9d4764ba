"""OpenAI-compatible request and response models. No serving logic lives here."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from server.engine.types import SamplingParams


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class ProtocolError(ValueError):
    """A request that is well-formed JSON but asks for something invalid or unsupported."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


# ----------------------------------------------------------------------------------- requests
def _encodable(value: Any) -> Any:
    """Raise if a string anywhere in `value` holds a lone UTF-16 surrogate."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"text holds a lone UTF-16 surrogate ({value[exc.start]!r} at position "
                f"{exc.start}); send valid Unicode"
            ) from None
    elif isinstance(value, list | tuple):
        for item in value:
            _encodable(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            _encodable(key)
            _encodable(item)
    return value


class RequestModel(BaseModel):
    """Base of every request body. JSON may escape lone surrogates ("\\ud800") that no
    tokenizer, path or log line can encode; they are refused here as a 400 naming the field,
    not met later as a 500."""

    @field_validator("*", mode="after")
    @classmethod
    def _valid_unicode(cls, value: Any) -> Any:
        return _encodable(value)


class TextPart(RequestModel):
    type: Literal["text"]
    text: str


class ChatMessage(RequestModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(RequestModel):
    include_usage: bool = False


class RagOptions(RequestModel):
    """The `rag` request field as an object; `rag: true` means all defaults."""

    model_config = ConfigDict(extra="forbid")

    index: str | None = None
    top_k: int | None = Field(None, ge=1, le=50)
    mode: Literal["dense", "bm25", "hybrid"] | None = None
    min_score: float | None = None


class _GenerationRequest(RequestModel):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    # Unknown fields are accepted and ignored (new SDK versions add optional fields); fields we
    # know but cannot honour are rejected in `unsupported()` rather than silently ignored.
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    # The range torch's generator accepts (int64 and uint64); beyond it seeding would fail.
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    rag: bool | RagOptions | None = None

    def rag_options(self) -> RagOptions | None:
        if self.rag is None or self.rag is False:
            return None
        return RagOptions() if self.rag is True else self.rag

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        return stops

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def unsupported(self) -> None:
        if self.n != 1:
            raise ProtocolError("n > 1 is not supported; send one request per completion", "n")
        if self.presence_penalty or self.frequency_penalty:
            param = "presence_penalty" if self.presence_penalty else "frequency_penalty"
            raise ProtocolError(f"{param} is not supported; leave it at 0", param)
        if self.logit_bias:
            raise ProtocolError("logit_bias is not supported", "logit_bias")
        if self.stream_options is not None and not self.stream:
            raise ProtocolError("stream_options is only allowed with stream=true", "stream_options")

    def to_sampling_params(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=tuple(self.stop or ()),
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _max_tokens_agree(self) -> ChatCompletionRequest:
        if (
            self.max_tokens is not None
            and self.max_completion_tokens is not None
            and self.max_tokens != self.max_completion_tokens
        ):
            raise ValueError("max_tokens and max_completion_tokens disagree; send one of them")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def unsupported(self) -> None:
        super().unsupported()
        if self.logprobs:
            raise ProtocolError("logprobs are not supported", "logprobs")
        if self.tools:
            raise ProtocolError("tools (function calling) are not supported", "tools")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise ProtocolError("only response_format type 'text' is supported", "response_format")

    def conversation(self) -> list[dict[str, str]]:
        # "developer" is OpenAI's newer name for the system role.
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in self.messages
        ]


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str] | list[int]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for /v1/completions
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None

    def unsupported(self) -> None:
        super().unsupported()
        for name in ("echo", "logprobs", "suffix"):
            if getattr(self, name):
                raise ProtocolError(f"{name} is not supported", name)
        if self.best_of not in (None, 1):
            raise ProtocolError("best_of > 1 is not supported", "best_of")
        prompts = self.prompt if isinstance(self.prompt, list) else []
        if prompts and isinstance(prompts[0], str) and len(prompts) != 1:
            raise ProtocolError(
                "batched prompts are not supported; send one request per prompt", "prompt"
            )

    def prompt_text_or_ids(self) -> str | list[int]:
        if isinstance(self.prompt, list):
            if not self.prompt:
                raise ProtocolError("prompt must not be empty", "prompt")
            return self.prompt[0] if isinstance(self.prompt[0], str) else self.prompt
        return self.prompt


# ---------------------------------------------------------------------------------- responses
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


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ResponseMessage
    finish_reason: str | None
    logprobs: None = None


class Source(BaseModel):
    """A retrieved chunk cited by the answer; `[n]` in the text is sources[n-1]."""

    index: str
    source: str
    chunk_id: str
    score: float
    text: str
    title: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage
    sources: list[Source] | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    sources: list[Source] | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None
    sources: list[Source] | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "ragtune"
    root: str | None = None
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -------------------------------------------------------------------------------- embeddings
class EmbeddingRequest(RequestModel):
    model_config = ConfigDict(extra="allow")

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None

    def texts(self) -> list[str]:
        items = [self.input] if isinstance(self.input, str) else self.input
        if not items:
            raise ProtocolError("input must not be empty", "input")
        if not all(isinstance(item, str) for item in items):
            raise ProtocolError("token-id input is not supported; send text", "input")
        if len(items) > 2048:
            raise ProtocolError("at most 2048 inputs per request", "input")
        if any(not item.strip() for item in items):
            raise ProtocolError("input strings must not be empty", "input")
        return list(items)


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


# ------------------------------------------------------------------------------ admin: adapters
class LoadLoraAdapterRequest(RequestModel):
    """vLLM-compatible (`lora_name`, `lora_path`) plus ragtune's versioning fields."""

    model_config = ConfigDict(extra="forbid")

    lora_name: str
    lora_path: str
    version: str | None = None
    replace: bool = False
    activate: bool = True


class UnloadLoraAdapterRequest(RequestModel):
    model_config = ConfigDict(extra="allow")  # vLLM clients may send lora_int_id

    lora_name: str
    version: str | None = None


class ActivateAdapterRequest(RequestModel):
    model_config = ConfigDict(extra="forbid")

    version: str


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class IndexSourcesRequest(RequestModel):
    """Documents to index: files or directories under `retrieval.source_roots`."""

    model_config = ConfigDict(extra="forbid")

    sources: list[str] = Field(min_length=1, max_length=256)
