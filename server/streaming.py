"""Server-sent events for /v1/chat/completions and /v1/completions with `stream: true`: one
event per engine output of each choice (tagged with the choice's `index`, carrying the
logprobs of its tokens when asked), a usage event after every choice finished, `[DONE]`."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi.responses import StreamingResponse

from server.attribution import note_failed
from server.chat_protocol import ChatCompletionRequest
from server.choices import ChoiceResult, Echo, total_completion_tokens, total_prompt_tokens
from server.completion_protocol import CompletionRequest
from server.engine import RequestStream, StepOutput
from server.errors import sse_error, to_api_error
from server.logprobs import chat_content, completion_logprobs
from server.protocol import Source
from server.responses import (
    ChatChoiceLogprobs,
    ChatChunkChoice,
    ChatCompletionChunk,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    DeltaMessage,
    DeltaToolCall,
    Usage,
)
from server.tools import finish_reply

if TYPE_CHECKING:
    from server.serving import OpenAIServing


def event(model: Any) -> str:
    return f"data: {model.model_dump_json(exclude_none=True)}\n\n"


def _failed(exc: Exception) -> str:
    """The error event ending a stream; a server error counts against the adapter version
    that served it (server/attribution.py), though the response's status was already 200."""
    error = to_api_error(exc)
    if error.status_code >= 500:
        note_failed()
    return sse_error(error)


def sse(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


class _Totals:
    """The last output of each choice, for the usage event."""

    def __init__(self, choices: int, n: int = 1):
        self.finals = [StepOutput() for _ in range(choices)]
        self.n = n  # choices per prompt

    def usage(self) -> Usage:
        finals = self.finals
        return Usage.of(total_prompt_tokens(finals, self.n), total_completion_tokens(finals))


async def chat_events(
    serving: OpenAIServing,
    request: ChatCompletionRequest,
    response_id: str,
    streams: list[RequestStream],
    sources: list[Source] | None,
) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(choices: list[ChatChunkChoice], **extra: Any) -> str:
        return event(
            ChatCompletionChunk(
                id=response_id,
                created=created,
                model=request.model,
                system_fingerprint=serving.system_fingerprint,
                choices=choices,
                **extra,
            )
        )

    for i in range(len(streams)):  # the role first, one event per choice (as vLLM)
        role = ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
        yield chunk([role], sources=sources if i == 0 else None)
    totals = _Totals(len(streams))
    # With tools, a reply is parsed whole: its text and logprobs wait for the end, then go as
    # one content delta and one tool_calls delta (the calls complete, as OpenAI may send them)
    tools = request.uses_tools
    forced = tools and request.tool_choice_mode().mode in ("required", "function")
    held = [ChoiceResult() for _ in streams] if tools else []
    try:
        async for i, output in serving.choice_outputs(streams, request.model):
            totals.finals[i] = output
            text, entries, delta = output.text, output.logprobs or [], None
            if tools:
                held[i].add(output)
                if not output.finished:
                    continue
                content, calls, reason = finish_reply(held[i].text, output.finish_reason, forced)
                entries = held[i].logprobs
                delta = DeltaMessage(
                    content=content,
                    tool_calls=[DeltaToolCall(index=n, **c) for n, c in enumerate(calls or [])]
                    or None,
                )
            elif not (text or output.finished):
                continue
            logprobs = None
            if request.logprobs:
                logprobs = ChatChoiceLogprobs(content=chat_content(entries, serving.token_texts))
            choice = ChatChunkChoice(
                index=i,
                delta=delta or DeltaMessage(content=text or None),
                finish_reason=reason if tools else output.finish_reason,
                logprobs=logprobs,
            )
            yield chunk([choice])
        if request.include_usage:
            yield chunk([], usage=totals.usage())
    except Exception as exc:
        yield _failed(exc)
    yield "data: [DONE]\n\n"


async def completion_events(
    serving: OpenAIServing,
    request: CompletionRequest,
    response_id: str,
    streams: list[RequestStream],
    sources: list[Source] | None,
    echoes: list[Echo] | None = None,  # per choice, with echo: its prompt goes first
) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(choices: list[CompletionChoice], **extra: Any) -> str:
        return event(
            CompletionResponse(
                id=response_id,
                created=created,
                model=request.model,
                system_fingerprint=serving.system_fingerprint,
                choices=choices,
                **extra,
            )
        )

    if sources is not None:  # citations come first, before any text
        yield chunk([CompletionChoice(text="", finish_reason=None)], sources=sources)
    totals = _Totals(len(streams), request.n)
    offsets = [0] * len(streams)  # text already sent per choice: where its next token starts
    echoed = [not echoes] * len(streams)
    try:
        async for i, output in serving.choice_outputs(streams, request.model):
            totals.finals[i] = output
            if not (output.text or output.finished or not echoed[i]):
                continue
            text, logprobs = output.text, None
            if request.logprobs is not None:
                logprobs = CompletionLogprobs()
            if not echoed[i]:  # the choice's first chunk: its prompt (vLLM streams it so)
                echo, echoed[i] = echoes[i], True
                text = echo.text + text
                if logprobs is not None:
                    prompt = output.prompt_logprobs or [None] * len(echo.token_ids)
                    completion_logprobs(prompt, serving.token_texts, 0, echo.token_ids, logprobs)
                offsets[i] = len(echo.text)
            if logprobs is not None:
                entries = output.logprobs or []
                completion_logprobs(entries, serving.token_texts, offsets[i], out=logprobs)
            offsets[i] += len(output.text)
            choice = CompletionChoice(
                index=i, text=text, finish_reason=output.finish_reason, logprobs=logprobs
            )
            yield chunk([choice])
        if request.include_usage:
            yield chunk([], usage=totals.usage())
    except Exception as exc:
        yield _failed(exc)
    yield "data: [DONE]\n\n"
