"""/v1/chat/completions request models: messages (with tool calls sent back as history), tool
definitions and `tool_choice`, and the conversation the chat template takes."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.engine.types import SamplingParams
from server.protocol import MAX_LOGPROBS, ProtocolError, RequestModel, _GenerationRequest


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
    prompt_logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_LOGPROBS,
        description="vLLM's extension: every prompt token's logprob (after the first) and its "
        "top k alternatives, as the response's `prompt_logprobs`; not with stream",
    )
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

    def to_sampling_params(self, max_tokens: int) -> SamplingParams:
        params = super().to_sampling_params(max_tokens)
        if self.prompt_logprobs is not None:
            return replace(params, prompt_logprobs=self.prompt_logprobs, prompt_ranks=True)
        return params

    def unsupported(self) -> None:
        super().unsupported()
        if self.top_logprobs is not None and not self.logprobs:
            raise ProtocolError("top_logprobs needs logprobs=true", "top_logprobs")
        if self.prompt_logprobs is not None and self.stream:
            raise ProtocolError(
                "prompt_logprobs are not available with stream=true", "prompt_logprobs"
            )
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
