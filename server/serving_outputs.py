"""Engine output for the serving layer: each choice's stream under the request deadline (a
504 past it, the slot always freed), the choices merged as their outputs arrive, latency and
token metrics; collected into results and usage for a JSON response."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from ragtune.config import Settings
from server.choices import ChoiceResult, merged, total_completion_tokens, total_prompt_tokens
from server.engine import RequestStream, StepOutput
from server.errors import APIError, InternalError, ServiceUnavailableError
from server.metrics import Metrics
from server.responses import Usage


class RequestTimeoutError(APIError):
    """A request still running at limits.request_timeout_s."""

    status_code = 504
    error_type = "timeout_error"
    code = "request_timeout"


class OutputCollector:
    """Engine outputs for OpenAIServing (server/serving.py) and the streams it shapes
    (server/streaming.py)."""

    def __init__(self, metrics: Metrics, settings: Settings):
        self.metrics = metrics
        self.settings = settings

    def choice_outputs(
        self, streams: list[RequestStream], model: str
    ) -> AsyncIterator[tuple[int, StepOutput]]:
        """Every choice's outputs as they arrive, tagged with the choice's index."""
        return merged([self._outputs(stream, model) for stream in streams])

    async def _outputs(self, stream: RequestStream, model: str) -> AsyncIterator[StepOutput]:
        """Engine outputs with the per-request deadline applied; always frees the slot."""
        started = time.monotonic()
        # one timer per request, not a wait_for (a task and a timer) per token
        timer = stream.loop.call_later(self.settings.limits.request_timeout_s, stream.expire)
        first = True
        try:
            while True:
                try:
                    output = await anext(stream)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise RequestTimeoutError(
                        f"request exceeded limits.request_timeout_s="
                        f"{self.settings.limits.request_timeout_s}"
                    ) from None
                if first:
                    self.metrics.ttft.labels(model).observe(time.monotonic() - started)
                    first = False
                if output.finished:
                    self._observe_finished(model, output, time.monotonic() - started)
                if output.finished and output.finish_reason in ("abort", "error"):
                    error = output.error or "request aborted"
                    if "shut down" in error:
                        raise ServiceUnavailableError(error)
                    raise InternalError(error)
                yield output
                if output.finished:
                    return
        finally:
            timer.cancel()
            stream.cancel()

    def _observe_finished(self, model: str, output: StepOutput, seconds: float) -> None:
        self.metrics.latency.labels(model).observe(seconds)
        self.metrics.generations.labels(model, output.finish_reason).inc()
        self.metrics.tokens.labels(model, "prompt").inc(output.prompt_tokens)
        self.metrics.tokens.labels(model, "completion").inc(output.completion_tokens)

    async def collect(self, streams: list[RequestStream], model: str) -> list[ChoiceResult]:
        results = [ChoiceResult() for _ in streams]
        async for index, output in self.choice_outputs(streams, model):
            results[index].add(output)
        return results


def usage_of(results: list[ChoiceResult], n: int = 1) -> Usage:
    """A response's usage: each prompt once (`n` choices share it), every choice's tokens."""
    finals = [result.final for result in results]
    return Usage.of(total_prompt_tokens(finals, n), total_completion_tokens(finals))
