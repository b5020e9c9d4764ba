"""What the protocol modules share: the request base (which refuses lone surrogates),
ProtocolError, the fields both generation endpoints take and their translation to
`SamplingParams`, and the small responses no one endpoint owns (errors, sources, the model
list). Each endpoint's own models are in server/*_protocol.py, the generation responses in
server/responses.py. No serving logic lives here."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

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


class StreamOptions(RequestModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class RagOptions(RequestModel):
    """The `rag` request field as an object; `rag: true` means all defaults."""

    model_config = ConfigDict(extra="forbid")

    index: str | None = None
    top_k: int | None = Field(None, ge=1, le=50)
    mode: Literal["dense", "bm25", "hybrid"] | None = None
    min_score: float | None = None


MAX_STOP_STRINGS = 16
MAX_PROMPTS = 128  # prompts in one /v1/completions request
MAX_LOGPROBS = 20
MAX_N = 8


class _GenerationRequest(RequestModel):
    """Fields shared by /v1/chat/completions and /v1/completions.

    Nothing is silently ignored: a field that is not declared here is a 400 naming it
    (`extra="forbid"`), a declared field this server cannot honour yet is a 400 naming it
    (`unsupported()`), and only metadata (`user`, `metadata`, `store`, `service_tier`) is
    accepted without effect."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    # vLLM's: requests share cached prompt prefixes only with the same salt (and tenant)
    cache_salt: str | None = Field(None, min_length=1, max_length=256)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    # The range torch's generator accepts (int64 and uint64); beyond it seeding would fail.
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOP_STRINGS} strings")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N, description="choices; child i is seeded with seed + i")
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(
        None, description="token id (as a string) -> bias in [-100, 100] added to its logit"
    )
    # vLLM's sampling extensions
    top_k: int | None = Field(None, ge=-1, description="0 or -1: all tokens")
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    stop_token_ids: list[int] | None = None
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    # accepted and ignored: metadata for OpenAI's own dashboards and billing
    user: str | None = Field(None, description="ignored")
    metadata: dict[str, str] | None = Field(None, description="ignored")
    store: bool | None = Field(None, description="ignored: nothing is stored")
    service_tier: str | None = Field(None, description="ignored")
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
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop sequences are allowed")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not key.isdigit():
                raise ValueError(f"keys are token ids as decimal strings, not {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"bias {bias} for token {key} is outside [-100, 100]")
        return value

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def unsupported(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise ProtocolError("stream_options is only allowed with stream=true", "stream_options")

    def token_ids(self) -> dict[str, list[int]]:
        """Token ids the request names, by field, for the caller to check against the vocabulary."""
        return {
            "logit_bias": [int(key) for key in self.logit_bias or {}],
            "stop_token_ids": list(self.stop_token_ids or ()),
        }

    def top_logprobs_wanted(self) -> int | None:
        """How many top logprobs per generated token (None: no logprobs)."""
        return None

    def to_sampling_params(self, max_tokens: int) -> SamplingParams:
        if self.min_tokens > max_tokens:
            raise ProtocolError(
                f"min_tokens ({self.min_tokens}) exceeds max_tokens ({max_tokens})", "min_tokens"
            )
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=tuple(self.stop or ()),
            top_k=max(self.top_k or 0, 0),
            min_p=self.min_p or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias=tuple((int(k), float(v)) for k, v in (self.logit_bias or {}).items() if v),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
            logprobs=self.top_logprobs_wanted(),
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


# ---------------------------------------------------------------------------- shared responses
class Source(BaseModel):
    """A retrieved chunk cited by the answer; `[n]` in the text is sources[n-1]."""

    index: str
    source: str
    chunk_id: str
    score: float
    text: str
    title: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "ragtune"
    root: str | None = None
    parent: str | None = None
    # the base model's card: which engine runner serves it ("compact:<family>" batches
    # adapters; "serial" is the fallback for other architectures, base model only)
    runner: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
