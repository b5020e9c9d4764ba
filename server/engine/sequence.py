"""One request's life inside the engine: its tokens, its text state and when it is done."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from server.engine.controls import RowControls
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.grammar import RowGrammar
from server.engine.sampler import make_generator
from server.engine.stop import StopMatcher
from server.engine.types import FinishReason, GenerationRequest, StepOutput, TokenLogprobs

Emit = Callable[[StepOutput], None]


class Sequence:
    def __init__(self, request: GenerationRequest, tokenizer: Any, eos_ids: set[int], emit: Emit):
        self.request = request
        params = self.params = request.params
        self.output_ids: list[int] = []
        self.generator = make_generator(params.seed)
        # Owned by the model runner: KV slot (= decode row), tokens in the cache, LoRA slot.
        self.slot: int | None = None
        self.cache_len = 0
        self.lora_slot = -1
        self.cache: Any = None  # the fallback runner's per-sequence cache
        self.finish_reason: FinishReason | None = None
        # tokens that end the sequence (not part of its output): EOS unless ignore_eos, and
        # the request's stop_token_ids
        self._stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else eos_ids)
        grammar = RowGrammar(request.grammar) if request.grammar is not None else None
        self.controls = (
            RowControls(params, request.prompt_ids, self._stop_ids, grammar)
            if params.shapes_logits or grammar is not None
            else None
        )
        self._logprobs: list[TokenLogprobs] | None = [] if params.logprobs is not None else None
        # filled chunk by chunk by the runner; handed out with the first output
        self._prompt_logprobs: list[TokenLogprobs | None] | None = (
            [None] if params.prompt_logprobs is not None else None
        )
        self._emitted = 0  # output tokens already handed out with some text
        self._detok = IncrementalDetokenizer(tokenizer, request.prompt_ids)
        self._stop = StopMatcher(params.stop)
        self._emit = emit

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.request.prompt_ids[-1]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token_id: int, logprobs: TokenLogprobs | None = None) -> None:
        """Record a sampled token, emit the text it completes, and decide if we are done."""
        if token_id in self._stop_ids:
            self._finish("stop", self._stop.flush())
            return
        self.output_ids.append(token_id)
        if self._logprobs is not None and logprobs is not None:
            self._logprobs.append(logprobs)
        text = self._detok.push(token_id)
        if len(self.output_ids) >= self.params.min_tokens:  # vLLM: no stop before min_tokens
            text = self._stop.feed(text)
        if self._stop.stopped:
            self._finish("stop", text)
        elif len(self.output_ids) >= self.params.max_tokens:
            self._finish("length", text + self._stop.flush())
        elif text:
            self._emit(self._output(text))

    @property
    def prompt_scores(self) -> list[TokenLogprobs | None] | None:
        """The prompt logprobs gathered so far (the first token's None), until handed out."""
        return self._prompt_logprobs

    def add_prompt_logprobs(self, targets: list[int], scores) -> None:
        """One prompt chunk's scores (server.engine.models.RowScores) for `targets`."""
        if self._prompt_logprobs is None:
            return
        for i, token in enumerate(targets):
            top = tuple(zip(scores.top_ids[i], scores.top_logprobs[i], strict=True))
            rank = scores.ranks[i] if scores.ranks else None
            self._prompt_logprobs.append(TokenLogprobs(token, scores.logprobs[i], top, rank))

    def finish_prompt_only(self) -> None:
        """max_tokens 0 (scoring a prompt): done once the prompt is in, nothing sampled."""
        self._finish("length", "")

    def abort(self, reason: FinishReason = "abort", error: str | None = None) -> None:
        """Finish now; marked finished before emitting, so a failing callback cannot keep the
        sequence running."""
        if not self.finished:
            self.finish_reason = reason
            self._emit(self._output("", reason, error))

    def _finish(self, reason: FinishReason, text: str) -> None:
        # Emitted before it counts as finished: if the callback fails, the scheduler can
        # still finish the sequence with an error the client sees.
        self._emit(self._output(text, reason))
        self.finish_reason = reason

    def _output(
        self, text: str, reason: FinishReason | None = None, error: str | None = None
    ) -> StepOutput:
        """The output carrying `text` and every output token (and its logprobs) not yet
        handed out: a token whose text is held back travels with the text that completes it."""
        start, self._emitted = self._emitted, len(self.output_ids)
        prompt_logprobs, self._prompt_logprobs = self._prompt_logprobs, None
        return StepOutput(
            text=text,
            token_ids=self.output_ids[start:],
            finish_reason=reason,
            prompt_tokens=self.prompt_len,
            completion_tokens=len(self.output_ids),
            error=error,
            logprobs=None if self._logprobs is None else self._logprobs[start:],
            prompt_logprobs=prompt_logprobs,
        )
