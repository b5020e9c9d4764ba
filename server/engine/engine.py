"""The async boundary: HTTP handlers submit requests and iterate their outputs; a dedicated
thread owns the model and runs scheduler steps, so no model call ever blocks the event loop."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator

from ragtune.config import EngineConfig
from ragtune.models import LoadedModel
from server.engine.runner import build_runner
from server.engine.scheduler import Scheduler
from server.engine.sequence import Sequence
from server.engine.team_exactness import fewest_exact_threads
from server.engine.team_size import team_for
from server.engine.types import (
    EngineStoppedError,
    GenerationRequest,
    QueueFullError,
    StepOutput,
)

logger = logging.getLogger(__name__)


class RequestStream:
    """Async iterator over one request's StepOutputs; cancel() frees its slot next step.

    Outputs reach the event loop through the engine's outbox, once per engine step for all
    requests (one cross-thread wake-up per step, not one per token)."""

    def __init__(self, engine: Engine, request_id: str, loop: asyncio.AbstractEventLoop):
        self.request_id = request_id
        self._engine = engine
        self.loop = loop
        self._queue: asyncio.Queue[StepOutput | None] = asyncio.Queue()
        self._done = False

    def push(self, output: StepOutput) -> None:
        """Called from the engine thread (or after it stopped); delivered at the next flush."""
        self._engine.post(self, output)

    def deliver(self, output: StepOutput) -> None:
        """Event loop: make an output from the engine available to the iterator."""
        self._queue.put_nowait(output)

    def expire(self) -> None:
        """Event loop: end the iteration with TimeoutError (the request's deadline)."""
        self._queue.put_nowait(None)

    def __aiter__(self) -> AsyncIterator[StepOutput]:
        return self

    async def __anext__(self) -> StepOutput:
        if self._done:
            raise StopAsyncIteration
        output = await self._queue.get()
        if output is None:
            raise TimeoutError
        if output.finished:
            self._done = True
        return output

    def cancel(self) -> None:
        if not self._done:
            self._done = True
            self._engine.abort(self.request_id)


class Engine:
    def __init__(
        self,
        loaded: LoadedModel,
        config: EngineConfig,
        max_queue: int,
        max_seq_len: int,
        threads_setting: int | str | None = None,
    ):
        """`threads_setting`: `model.threads`; with `auto` the team shrinks while other work
        holds its cores (team_size.py)."""
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.max_queue = max_queue
        self.max_seq_len = max_seq_len
        self.eos_ids = _eos_ids(loaded)
        self.runner = build_runner(loaded, config, max_seq_len, threads_setting == "auto")
        self.scheduler = Scheduler(self.runner, config.max_batch_tokens)
        self.scheduler.after_prefill = self.flush
        self.team = team_for(
            loaded.device,
            threads_setting,
            lambda most: fewest_exact_threads(self.runner, self.tokenizer, most),
        )
        self._wake = threading.Event()
        self._stopping = False
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="ragtune-engine", daemon=True)
        self._outbox: list[tuple[RequestStream, StepOutput]] = []
        self._outbox_lock = threading.Lock()

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Queue a request; raises QueueFullError or EngineStoppedError (never blocks)."""
        if self._stopping:
            raise EngineStoppedError()
        if self.scheduler.num_waiting >= self.max_queue:
            raise QueueFullError(self.max_queue)
        stream = RequestStream(self, request.request_id, asyncio.get_running_loop())
        self.scheduler.add(Sequence(request, self.tokenizer, self.eos_ids, stream.push))
        self._wake.set()
        return stream

    def post(self, stream: RequestStream, output: StepOutput) -> None:
        with self._outbox_lock:
            self._outbox.append((stream, output))

    def flush(self) -> None:
        """Hand every posted output to its event loop in one thread-safe call per loop."""
        with self._outbox_lock:
            posted, self._outbox = self._outbox, []
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for stream, output in posted:
            by_loop.setdefault(stream.loop, []).append((stream, output))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # that loop has closed: nobody is waiting any more
                logger.debug("dropped %d outputs for a closed event loop", len(batch))

    def abort(self, request_id: str) -> None:
        self.scheduler.abort(request_id)
        self._wake.set()

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    def shutdown(self, drain_timeout_s: float = 30.0) -> None:
        """Refuse new work, let running and queued requests finish, then stop the thread."""
        self._stopping = True
        deadline = time.monotonic() + drain_timeout_s
        while self.scheduler.has_work() and time.monotonic() < deadline:
            self._wake.set()
            time.sleep(0.05)
        self._closed = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.scheduler.abort_all("server shut down before the request finished")
        self.flush()

    def _loop(self) -> None:
        while not self._closed:
            if not self.scheduler.has_work():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            self.team.before_step()
            try:
                self.scheduler.step()
            except Exception:  # the engine thread must outlive any one step
                logger.exception("engine step failed; failing the running requests")
                self.scheduler.fail_running("generation failed: internal engine error")
            self.flush()
            self.team.after_step()


def _deliver(batch: list[tuple[RequestStream, StepOutput]]) -> None:
    for stream, output in batch:
        stream.deliver(output)


def _eos_ids(loaded: LoadedModel) -> set[int]:
    ids: set[int] = set()
    if loaded.tokenizer.eos_token_id is not None:
        ids.add(int(loaded.tokenizer.eos_token_id))
    configured = getattr(loaded.model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    return ids
