"""Plain data crossing the engine boundary; no torch, no HTTP."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5


@dataclass
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: Any = None  # engine.lora.AdapterWeights, or None for the base model


@dataclass
class StepOutput:
    """What one engine step produced for one request: text to send and, at the end, why."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class EngineError(Exception):
    """Base for errors the HTTP layer maps to a status code."""


class QueueFullError(EngineError):
    def __init__(self, max_queue: int, retry_after_s: int = 1):
        super().__init__(
            f"server is at capacity: {max_queue} requests already waiting (limits.max_queue); "
            f"retry after {retry_after_s}s"
        )
        self.retry_after_s = retry_after_s


class EngineStoppedError(EngineError):
    def __init__(self) -> None:
        super().__init__("server is shutting down and accepts no new requests")
