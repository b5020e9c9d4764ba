"""`n` choices per request (vLLM's parallel sampling): one engine sequence per choice, each
seeded `seed + index` when the request has a seed, their outputs merged as they arrive."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TypeVar

from server.engine.types import StepOutput, TokenLogprobs

T = TypeVar("T")
_SEED_SPAN = 2**64  # torch seeds: [-2**63, 2**64)


def child_seed(seed: int | None, index: int) -> int | None:
    """Choice `index`'s seed: vLLM's `seed + index`, wrapped into torch's seed range; None stays
    None (each choice then draws its own random seed)."""
    if seed is None:
        return None
    child = seed + index
    return child - _SEED_SPAN if child >= _SEED_SPAN else child


async def merged(iterators: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Items of several async iterators as they arrive, tagged with the iterator's index. The
    first exception from any of them ends the merge; leaving it early (or failing) cancels
    the others, whose own cleanup (freeing engine slots) then runs. One iterator is passed
    through with no task at all."""
    if len(iterators) == 1:
        async for item in iterators[0]:
            yield 0, item
        return
    queue: asyncio.Queue[tuple[int, T | None, BaseException | None, bool]] = asyncio.Queue()

    async def pump(index: int, iterator: AsyncIterator[T]) -> None:
        try:
            async for item in iterator:
                queue.put_nowait((index, item, None, False))
        except Exception as exc:
            queue.put_nowait((index, None, exc, True))
        else:
            queue.put_nowait((index, None, None, True))

    tasks = [asyncio.create_task(pump(i, it)) for i, it in enumerate(iterators)]
    try:
        running = len(tasks)
        while running:
            index, item, error, done = await queue.get()
            if error is not None:
                raise error
            if done:
                running -= 1
            else:
                yield index, item  # type: ignore[misc]
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


@dataclass
class ChoiceResult:
    """One choice's whole output, gathered from its StepOutputs."""

    parts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    final: StepOutput = field(default_factory=StepOutput)

    def add(self, output: StepOutput) -> None:
        self.parts.append(output.text)
        if output.logprobs:
            self.logprobs.extend(output.logprobs)
        if output.prompt_logprobs is not None:
            self.prompt_logprobs = output.prompt_logprobs
        self.final = output

    @property
    def text(self) -> str:
        return "".join(self.parts)


@dataclass(frozen=True)
class Echo:
    """A completion choice's echoed prompt (`echo: true`): its text and its tokens."""

    text: str
    token_ids: list[int]


def total_prompt_tokens(finals: list[StepOutput], n: int) -> int:
    """Every prompt once (several prompts in one completions request each count)."""
    return sum(output.prompt_tokens for output in finals[::n])


def total_completion_tokens(finals: list[StepOutput]) -> int:
    """Usage counts every choice's tokens (the prompt once, as OpenAI and vLLM do)."""
    return sum(output.completion_tokens for output in finals)
