"""Iteration-level scheduler: each step admits waiting requests (prefill, chunked if long),
then advances every running sequence by one token in one batched forward; a finished
sequence leaves at the end of the step and its slot is reused by the next admission."""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

import torch

from server.engine.sampler import row_draws
from server.engine.sequence import Sequence
from server.engine.types import FinishReason

logger = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, runner, max_batch_tokens: int):
        self.runner = runner
        self.max_batch_tokens = max_batch_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._aborted: set[str] = set()
        self._lock = threading.Lock()
        self.steps = 0
        self.on_batch: Callable[[int], None] | None = None  # metrics: rows per decode forward
        # hands outputs to the clients: first tokens go out before the step's decode forward
        self.after_prefill: Callable[[], None] | None = None

    # -- called from the event loop thread ---------------------------------------------------
    def add(self, seq: Sequence) -> None:
        with self._lock:
            self.waiting.append(seq)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborted.add(request_id)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- called from the engine thread --------------------------------------------------------
    def step(self) -> None:
        self.steps += 1
        self._drop_aborted()
        budget = self._admit(self.max_batch_tokens)
        self._prefill(budget)
        if self.after_prefill is not None:
            self.after_prefill()
        ready = [s for s in self.running if not s.finished and s.cache_len >= s.prompt_len]
        if ready and self.on_batch is not None:
            self.on_batch(len(ready))
        if ready:
            try:
                logits = self.runner.decode(ready)
            except Exception as exc:  # a failed forward must not take the server down
                logger.exception("decode step failed for %d sequences", len(ready))
                for seq in ready:
                    fail(seq, "generation failed", exc)
            else:
                self._sample(ready, logits)
        self._retire_finished()

    def _admit(self, budget: int) -> int:
        """Admit waiting sequences while slots and this step's prefill budget allow."""
        chunk = getattr(self.runner, "prefill_chunk", None)
        with self._lock:
            skipped: deque[Sequence] = deque()
            while self.waiting and budget > 0:
                seq = self.waiting.popleft()
                if not self.runner.can_admit(seq):
                    skipped.append(seq)  # e.g. its adapter needs a LoRA slot that is pinned
                    if not self._has_free_slot():
                        break
                    continue
                try:
                    self.runner.add(seq)
                except Exception as exc:  # e.g. an adapter the LoRA slots cannot take
                    fail(seq, "could not start the request", exc)
                    continue
                self.running.append(seq)
                budget -= min(seq.prompt_len - seq.cache_len, chunk or seq.prompt_len)
            self.waiting = skipped + self.waiting
        return budget

    def _has_free_slot(self) -> bool:
        probe = getattr(self.runner, "slots", None)
        return probe is None or len(probe) < self.runner.cache.num_slots

    def _prefill(self, budget: int) -> None:
        """Advance prompts by a chunk each, within this step's budget, in shared forwards;
        a prompt that completes samples its first token."""
        chunk = getattr(self.runner, "prefill_chunk", None)
        batch = []
        for seq in self.running:
            if seq.finished or seq.cache_len >= seq.prompt_len:
                continue
            if budget <= 0 and seq.cache_len > 0:
                break
            batch.append(seq)
            budget -= min(seq.prompt_len - seq.cache_len, chunk or seq.prompt_len)
        if not batch:
            return
        try:
            outputs = self.runner.prefill(batch)
        except Exception as exc:  # only the sequence that fails alone fails
            if len(batch) == 1:
                fail(batch[0], "prefill failed", exc)
                return
            logger.warning("shared prefill of %d prompts failed; one at a time", len(batch))
            outputs = []
            for seq in batch:
                try:
                    outputs.extend(self.runner.prefill([seq]))
                except Exception as exc:
                    fail(seq, "prefill failed", exc)
                    outputs.append(None)
        done = [(s, logits) for s, logits in zip(batch, outputs, strict=True) if logits is not None]
        for seq, _ in done:
            if seq.params.max_tokens == 0:
                seq.finish_prompt_only()
        done = [(s, logits) for s, logits in done if s.params.max_tokens > 0]
        if done:
            self._sample([s for s, _ in done], torch.stack([logits for _, logits in done]))

    @staticmethod
    def _sample(seqs: list[Sequence], logits) -> None:
        """Each row takes its token on its own: an exception in one sequence's draw,
        detokenization, stop matching or output callback finishes that sequence alone with
        finish_reason "error"; its batch neighbours carry on."""
        draws = row_draws(
            logits,
            [s.params for s in seqs],
            [s.generator for s in seqs],
            [s.controls for s in seqs],
        )
        for seq, draw in zip(seqs, draws, strict=True):
            try:
                seq.append(*draw())
            except Exception as exc:
                fail(seq, "generation failed", exc)

    def _drop_aborted(self) -> None:
        with self._lock:
            if not self._aborted:
                return
            aborted, self._aborted = self._aborted, set()
            kept: deque[Sequence] = deque()
            for seq in self.waiting:
                if seq.request_id in aborted:
                    quiet_abort(seq)
                else:
                    kept.append(seq)
            self.waiting = kept
        for seq in self.running:
            if seq.request_id in aborted:
                quiet_abort(seq)

    def _retire_finished(self) -> None:
        still = []
        for seq in self.running:
            if seq.finished:
                self.runner.release(seq)
            else:
                still.append(seq)
        self.running = still

    def abort_all(self, reason: str) -> None:
        with self._lock:
            pending, self.waiting = list(self.waiting), deque()
        for seq in pending + self.running:
            quiet_abort(seq, "error", reason)
        self._retire_finished()

    def fail_running(self, reason: str) -> None:
        """Last resort after a step failed outside any one sequence: finish every running
        sequence with an error and free its slot; waiting requests keep their place."""
        for seq in self.running:
            quiet_abort(seq, "error", reason)
        self._retire_finished()


def fail(seq: Sequence, what: str, exc: Exception) -> None:
    """Finish one sequence with finish_reason "error" (the client gets an error response);
    the traceback goes to the log only."""
    logger.error("%s for %s", what, seq.request_id, exc_info=exc)
    quiet_abort(seq, "error", f"{what}: {type(exc).__name__}")


def quiet_abort(seq: Sequence, reason: FinishReason = "abort", error: str | None = None) -> None:
    """Abort that never raises: the sequence is finished even if its output callback fails."""
    try:
        seq.abort(reason, error)
    except Exception:
        logger.exception("could not deliver the end of %s", seq.request_id)
