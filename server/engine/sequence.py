"""One request's life inside the engine: its tokens, its text state and when it is done."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.sampler import make_generator
from server.engine.stop import StopMatcher
from server.engine.types import FinishReason, GenerationRequest, StepOutput

Emit = Callable[[StepOutput], None]


class Sequence:
    def __init__(self, request: GenerationRequest, tokenizer: Any, eos_ids: set[int], emit: Emit):
        self.request = request
        self.params = request.params
        self.output_ids: list[int] = []
        self.generator = make_generator(request.params.seed)
        # Owned by the model runner: KV slot (= decode row), tokens in the cache, LoRA slot.
        self.slot: int | None = None
        self.cache_len = 0
        self.lora_slot = -1
        self.cache: Any = None  # the fallback runner's per-sequence cache
        self.finish_reason: FinishReason | None = None
        self._eos_ids = eos_ids
        self._detok = IncrementalDetokenizer(tokenizer, request.prompt_ids)
        self._stop = StopMatcher(request.params.stop)
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

    def append(self, token_id: int) -> None:
        """Record a sampled token, emit the text it completes, and decide if we are done."""
        if token_id in self._eos_ids:
            self._finish("stop", self._stop.flush())
            return
        self.output_ids.append(token_id)
        text = self._stop.feed(self._detok.push(token_id))
        if self._stop.stopped:
            self._finish("stop", text)
        elif len(self.output_ids) >= self.params.max_tokens:
            self._finish("length", text + self._stop.flush())
        elif text:
            self._emit(self._output(text, [token_id]))

    def abort(self, reason: FinishReason = "abort", error: str | None = None) -> None:
        """Finish now; marked finished before emitting, so a failing callback cannot keep the
        sequence running."""
        if not self.finished:
            self.finish_reason = reason
            self._emit(self._output("", [], reason, error))

    def _finish(self, reason: FinishReason, text: str) -> None:
        # Emitted before it counts as finished: if the callback fails, the scheduler can
        # still finish the sequence with an error the client sees.
        self._emit(self._output(text, self.output_ids[-1:], reason))
        self.finish_reason = reason

    def _output(
        self,
        text: str,
        ids: list[int],
        reason: FinishReason | None = None,
        error: str | None = None,
    ) -> StepOutput:
        return StepOutput(
            text=text,
            token_ids=ids,
            finish_reason=reason,
            prompt_tokens=self.prompt_len,
            completion_tokens=len(self.output_ids),
            error=error,
        )
