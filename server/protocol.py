"""OpenAI-compatible request models (and the small shared responses). No serving logic lives
here; the generation responses are in server/responses.py."""

from __future__ import annotations

import time
import uuid
from dataclasses import replace
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
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


# Keys the openai SDK writes (as null or empty) when a response message is sent back as
# history; any other extra key, or one of these with a value, is refused by name.
_ECHOED_MESSAGE_KEYS = frozenset({"refusal", "annotations", "audio", "function_call"})


class FunctionCall(RequestModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    arguments: str  # JSON text


class ToolCallIn(RequestModel):
    """An earlier assistant turn's call, sent back as history."""

    model_config = ConfigDict(extra="forbid")

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(RequestModel):
    # extra keys are allowed only empty (see unsupported_keys): an assistant message from the
    # SDK carries `refusal: null`, `audio: null` and the like
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(None, description="passed to the chat template with the message")
    tool_calls: list[ToolCallIn] | None = Field(None, description="an assistant turn's calls")
    tool_call_id: str | None = Field(None, description="the call a tool message answers")

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def unsupported_keys(self) -> list[str]:
        """Extra keys that carry something (tool calls, audio...) this server cannot use."""
        return [
            key
            for key, value in (self.model_extra or {}).items()
            if key not in _ECHOED_MESSAGE_KEYS or value not in (None, [], "", {})
        ]


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


class FunctionDefinition(RequestModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON schema of the arguments")
    strict: bool | None = Field(None, description="arguments always follow the schema here")


class ToolDefinition(RequestModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionDefinition


class ToolChoice(BaseModel):
    """`tool_choice` normalized: mode none | auto | required | function (with `name`)."""

    mode: Literal["none", "auto", "required", "function"]
    name: str | None = None


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = Field(None, description="logprobs of the generated tokens")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[ToolDefinition] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = Field(
        None,
        description="none | auto (default with tools) | required | "
        "{'type': 'function', 'function': {'name'}}",
    )
    parallel_tool_calls: bool | None = Field(
        None, description="with required: several calls allowed (default true)"
    )
    response_format: dict[str, Any] | None = Field(
        None,
        description="{'type': 'text' | 'json_object' | 'json_schema', 'json_schema': "
        "{'name', 'schema', 'strict'}}: the reply is constrained by a grammar",
    )

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

    def top_logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def unsupported(self) -> None:
        super().unsupported()
        if self.top_logprobs is not None and not self.logprobs:
            raise ProtocolError("top_logprobs needs logprobs=true", "top_logprobs")
        if self.tools is None and self.parallel_tool_calls is not None:
            raise ProtocolError("parallel_tool_calls needs tools", "parallel_tool_calls")
        choice = self.tool_choice_mode()
        if choice.mode in ("required", "function") and not self.tools:
            raise ProtocolError(f"tool_choice {choice.mode!r} needs tools", "tool_choice")
        if choice.mode == "function" and all(t.function.name != choice.name for t in self.tools):
            raise ProtocolError(
                f"tool_choice names {choice.name!r}, which is not in tools", "tool_choice"
            )
        format_type = (self.response_format or {}).get("type", "text")
        if self.tools and self.tool_choice_mode().mode != "none" and format_type != "text":
            raise ProtocolError(
                "response_format and tools cannot constrain one reply together",
                "response_format",
            )
        check_messages(self.messages)

    def conversation(self) -> list[dict[str, str]]:
        return conversation(self.messages)

    def tool_choice_mode(self) -> ToolChoice:
        choice = self.tool_choice
        if choice is None:
            return ToolChoice(mode="auto" if self.tools else "none")
        if isinstance(choice, str):
            return ToolChoice(mode=choice)
        function = choice.get("function")
        if choice.get("type") != "function" or not isinstance(function, dict):
            raise ProtocolError(
                "tool_choice must be none, auto, required or "
                "{'type': 'function', 'function': {'name': ...}}",
                "tool_choice",
            )
        name = function.get("name")
        if not isinstance(name, str):
            raise ProtocolError("tool_choice.function.name must be a string", "tool_choice")
        return ToolChoice(mode="function", name=name)

    @property
    def uses_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice_mode().mode != "none"


def check_messages(messages: list[ChatMessage]) -> None:
    """Refuse, by name, message keys that carry something this server cannot use."""
    for i, message in enumerate(messages):
        for key in message.unsupported_keys():
            raise ProtocolError(f"messages[{i}].{key} is not supported", f"messages.{i}.{key}")


def conversation(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """Messages as the chat template takes them; "developer" is OpenAI's newer name for the
    system role, a `name` goes along for templates that use it."""
    turns = []
    for m in messages:
        turn = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.name is not None:
            turn["name"] = m.name
        turns.append(turn)
    return turns


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    # OpenAI's default for /v1/completions; 0 (with echo) scores the prompt, generating nothing
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_LOGPROBS,
        description="logprobs of the generated tokens (and with echo the prompt's) and the top k",
    )
    echo: bool = Field(False, description="the prompt before the completion (and its logprobs)")
    suffix: str | None = Field(None, description="not supported (400)")
    best_of: int | None = Field(None, ge=1, description="only equal to n (or unset)")

    def top_logprobs_wanted(self) -> int | None:
        return self.logprobs

    def unsupported(self) -> None:
        super().unsupported()
        if self.suffix:
            raise ProtocolError("suffix is not supported", "suffix")
        if self.best_of not in (None, self.n):
            raise ProtocolError("best_of other than n is not supported", "best_of")
        if self.max_tokens == 0 and not self.echo:
            raise ProtocolError("max_tokens 0 generates nothing: use it with echo", "max_tokens")

    def to_sampling_params(self, max_tokens: int) -> SamplingParams:
        params = super().to_sampling_params(max_tokens)
        if self.echo and self.logprobs is not None:
            return replace(params, prompt_logprobs=self.logprobs)
        return params

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids (several give several choices)."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise ProtocolError("prompt must not be empty", "prompt")
        if all(isinstance(item, int) for item in prompt):
            return [prompt]  # type: ignore[list-item]
        if not all(isinstance(item, str | list) for item in prompt):
            raise ProtocolError("prompt mixes text and token ids", "prompt")
        if len(prompt) > MAX_PROMPTS:
            raise ProtocolError(f"at most {MAX_PROMPTS} prompts per request", "prompt")
        return list(prompt)  # type: ignore[arg-type]


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


# -------------------------------------------------------------------------------- embeddings
class EmbeddingRequest(RequestModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = Field(None, description="ignored")

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


class CanaryRequest(RequestModel):
    """POST /v1/adapters/{name}/canary: send `fraction` of `model=name` traffic to
    `version` (a loaded version other than the active one)."""

    model_config = ConfigDict(extra="forbid")

    version: str
    fraction: float = Field(gt=0, le=1)


class PromoteAdapterRequest(RequestModel):
    """POST /v1/adapters/{name}/promote: a gate's decision (`ragtune adapters promote`),
    audited and written to the version's manifest; `accepted` also activates `version`."""

    model_config = ConfigDict(extra="forbid")

    version: str
    accepted: bool
    gate: dict[str, Any] = Field(default_factory=dict)  # metric, min_delta, the numbers
    requested_by: str | None = Field(None, max_length=200)


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
