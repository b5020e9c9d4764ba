"""The engine owns the model: requests go in, streams of tokens come out."""

from server.engine.engine import Engine, RequestStream
from server.engine.types import (
    EngineError,
    EngineStoppedError,
    FinishReason,
    GenerationRequest,
    QueueFullError,
    SamplingParams,
    StepOutput,
)

__all__ = [
    "Engine",
    "EngineError",
    "EngineStoppedError",
    "FinishReason",
    "GenerationRequest",
    "QueueFullError",
    "RequestStream",
    "SamplingParams",
    "StepOutput",
]
