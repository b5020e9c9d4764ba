"""/v1/embeddings request and response models (the retrieval embedder serves them)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from server.protocol import ProtocolError, RequestModel


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
