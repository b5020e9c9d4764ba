"""POST /v1/feedback request and response bodies (the generation protocol is in
server/chat_protocol.py and server/completion_protocol.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from server.protocol import MAX_N, RequestModel

MAX_CORRECTION_CHARS = 20_000
MAX_COMMENT_CHARS = 4_000


class FeedbackRequest(RequestModel):
    """A rating of one chat completion, named by the `id` of its response."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(
        ..., min_length=1, max_length=200, description="the chat completion's response id"
    )
    rating: Literal["up", "down"]
    correction: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_CORRECTION_CHARS,
        description="the answer the model should have given; kept only with "
        "feedback.store_conversations on",
    )
    comment: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_COMMENT_CHARS,
        description="free text for the operator; kept only with feedback.store_conversations on",
    )
    choice: int = Field(0, ge=0, lt=MAX_N, description="which choice is rated (with n > 1)")


class FeedbackResponse(BaseModel):
    object: Literal["feedback"] = "feedback"
    id: str
    rating: Literal["up", "down"]
    model: str = Field(description="the `model` the rated request named")
    adapter: str | None = Field(description="the adapter that answered (null: base model)")
    version: str | None = Field(description="the adapter version that answered")
    correction_kept: bool = Field(
        description="false when a correction was sent but not stored "
        "(feedback.store_conversations is off), or none was sent"
    )
    comment_kept: bool
