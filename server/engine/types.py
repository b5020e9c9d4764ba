"""Plain data crossing the engine boundary; no torch, no HTTP."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass(frozen=True)
class SamplingParams:
    """One sequence's sampling controls (vLLM's semantics; OpenAI's for the penalties and
    `logit_bias`). Defaults change nothing: a request that sets none of them samples exactly
    as plain greedy/temperature/top-p sampling."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    top_k: int = 0  # 0 (or -1): every token
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # on prompt and output tokens, as vLLM and HF
    presence_penalty: float = 0.0  # on output tokens, as OpenAI
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    stop_token_ids: tuple[int, ...] = ()
    min_tokens: int = 0  # EOS and stop_token_ids are masked (and stop strings not matched) before
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k: the chosen token's logprob and the top k
    # the same for every prompt token after the first (echo + logprobs; lm-eval scoring)
    prompt_logprobs: int | None = None
    prompt_ranks: bool = False  # with prompt_logprobs: each prompt token's rank (chat's)

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def penalized(self) -> bool:
        return bool(
            self.repetition_penalty != 1.0 or self.presence_penalty or self.frequency_penalty
        )

    @property
    def shapes_logits(self) -> bool:
        """Whether the logits are changed before the token is chosen (bias, penalties or the
        min_tokens mask); rows that do not skip that work entirely."""
        return bool(self.logit_bias or self.min_tokens or self.penalized)


@dataclass(frozen=True)
class TokenLogprobs:
    """A generated token's log-probability under the model's raw distribution (log-softmax of
    the logits before bias, penalties, temperature and truncation) and the `top` most likely
    (token id, logprob) pairs, most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    rank: int | None = None  # 1 = most likely; computed for prompt tokens (vLLM's `rank`)


@dataclass
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: Any = None  # engine.lora.AdapterWeights, or None for the base model
    grammar: Any = None  # a compiled grammar (engine.grammar) the output must follow
    # the tenant's prefix-cache namespace (server/tenancy.py): "" shares blocks with every
    # request; otherwise only requests of the same tenant (and cache_salt) share them
    cache_namespace: str = ""


@dataclass
class StepOutput:
    """What one engine step produced for one request: text to send and, at the end, why.
    `token_ids` are the output tokens this text completes (all since the last output), and
    `logprobs` theirs when the request asked; `prompt_logprobs` (first output only) one
    entry per prompt token, None for the first, which nothing predicts."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None

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
