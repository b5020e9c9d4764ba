"""Request and response models of the vLLM-compatible tokenizer routes (`/tokenize`,
`/detokenize`, `/tokenizer_info`), which lm-evaluation-harness's remote tokenizer uses."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from server.chat_protocol import ChatMessage, check_messages
from server.protocol import ProtocolError, RequestModel


class TokenizeRequest(RequestModel):
    """Either `prompt` (text as /v1/completions takes it) or `messages` (a conversation as
    /v1/chat/completions renders it through the chat template)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="a served model or adapter (same tokenizer)")
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_generation_prompt: bool | None = Field(None, description="messages only; default true")
    add_special_tokens: bool | None = Field(
        None, description="default true for a prompt, false for messages (vLLM's defaults)"
    )
    return_token_strs: bool = False

    def check(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ProtocolError("send exactly one of prompt and messages", "prompt")
        if self.prompt is not None and self.add_generation_prompt is not None:
            raise ProtocolError(
                "add_generation_prompt applies to messages, not to a prompt",
                "add_generation_prompt",
            )
        if self.messages is not None:
            check_messages(self.messages)


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(RequestModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfoResponse(BaseModel):
    """The subset of vLLM's tokenizer_info that clients read (lm-eval: the special tokens and
    the chat template); no file paths."""

    tokenizer_class: str
    eos_token: str | None = None
    bos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    eos_token_id: int | None = None
    bos_token_id: int | None = None
    vocab_size: int
    model_max_length: int
    chat_template: str | None = None
