"""Iteration-level scheduler: every step admits waiting requests, then advances every
running sequence by one token; a finished sequence leaves at once and frees its slot."""

from __future__ import annotations

import logging
import threading
from collections import deque

from server.engine.runner import HFModelRunner
from server.engine.sampler import sample_batch
from server.engine.sequence import Sequence

logger = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, runner: HFModelRunner, max_batch_size: int, max_batch_tokens: int):
        self.runner = runner
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._aborted: set[str] = set()
        self._lock = threading.Lock()

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
        self._drop_aborted()
        admitted = self._admit()
        try:
            if admitted:
                self._advance(admitted, self.runner.prefill(admitted))
            decoding = [s for s in self.running if s not in admitted]
            if decoding:
                self._advance(decoding, self.runner.decode(decoding))
        except Exception as exc:  # a failed forward must not take the server down
            logger.exception("engine step failed; failing its %d sequences", len(self.running))
            for seq in self.running:
                seq.abort("error", f"generation failed: {type(exc).__name__}")
        self._retire_finished()

    def _admit(self) -> list[Sequence]:
        admitted: list[Sequence] = []
        budget = self.max_batch_tokens
        with self._lock:
            while self.waiting and len(self.running) < self.max_batch_size:
                seq = self.waiting[0]
                if admitted and seq.prompt_len > budget:
                    break
                self.waiting.popleft()
                budget -= seq.prompt_len
                admitted.append(seq)
                self.running.append(seq)
        return admitted

    def _advance(self, seqs: list[Sequence], logits) -> None:
        tokens = sample_batch(logits, [s.params for s in seqs], [s.generator for s in seqs])
        for seq, token in zip(seqs, tokens, strict=True):
            seq.append(token)

    def _drop_aborted(self) -> None:
        with self._lock:
            if not self._aborted:
                return
            aborted, self._aborted = self._aborted, set()
            kept = deque()
            for seq in self.waiting:
                (seq.abort() if seq.request_id in aborted else kept.append(seq))
            self.waiting = kept
        for seq in self.running:
            if seq.request_id in aborted:
                seq.abort()

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
            seq.abort("error", reason)
        self._retire_finished()
