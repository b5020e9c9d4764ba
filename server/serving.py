"""Serving logic for /v1/chat/completions and /v1/completions: validate against the limits,
turn the request into an engine request, and shape engine output as OpenAI JSON or SSE."""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse

from ragtune.config import Settings
from ragtune.models.chat import encode_prompt, render_chat
from server.adapters.errors import AdapterNotFoundError
from server.adapters.registry import AdapterRegistry
from server.engine import Engine, GenerationRequest, RequestStream, StepOutput
from server.engine.lora import AdapterWeights
from server.errors import (
    APIError,
    BadRequestError,
    InternalError,
    ModelNotFoundError,
    NotFoundError,
    ServiceUnavailableError,
    sse_error,
    to_api_error,
)
from server.metrics import Metrics
from server.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    RagOptions,
    ResponseMessage,
    Source,
    Usage,
    _GenerationRequest,
    new_id,
)
from server.rag import RetrievalService
from server.threads import run_blocking


class RequestTimeoutError(APIError):
    status_code = 504
    error_type = "timeout_error"
    code = "request_timeout"


class OpenAIServing:
    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        registry: AdapterRegistry,
        metrics: Metrics,
        retrieval: RetrievalService | None,
    ):
        self.engine = engine
        self.registry = registry
        self.metrics = metrics
        self.retrieval = retrieval
        self.settings = settings
        self.tokenizer = engine.tokenizer
        self.base_model_id = settings.model.served_model_name
        self.system_fingerprint = f"fp_{engine.loaded.fingerprint[:10]}"
        self.context_length = engine.max_seq_len

    # ------------------------------------------------------------------------ model selection
    def model_ids(self) -> list[str]:
        return [self.base_model_id, *self.registry.model_ids()]

    def served_ids(self) -> set[str]:
        """Every id a request's `model` may name: base, adapters, versions, the embedder."""
        ids = set(self.model_ids())
        if self.retrieval is not None:
            ids.add(self.retrieval.embedder_name)
        return ids

    async def resolve_adapter(self, model: str) -> AdapterWeights | None:
        """The adapter a `model` field names (None = base); unknown names are a 404, never
        a silent fallback to the base model."""
        if model == self.base_model_id:
            return None
        try:
            return await run_blocking(self.registry.resolve, model)
        except AdapterNotFoundError:
            raise ModelNotFoundError(model, self.model_ids()) from None

    # ------------------------------------------------------------------------------ requests
    async def create_chat_completion(self, request: ChatCompletionRequest) -> Any:
        request.unsupported()
        adapter = await self.resolve_adapter(request.model)
        conversation = request.conversation()
        sources = None
        if (options := request.rag_options()) is not None:
            turn = next((m for m in reversed(conversation) if m["role"] == "user"), None)
            if turn is None:
                raise BadRequestError("rag needs a user message to search for", "messages")
            turn["content"], sources = await self._retrieve(options, turn["content"], request.model)
        prompt_ids = encode_prompt(self.tokenizer, render_chat(self.tokenizer, conversation))
        gen = self._engine_request("chatcmpl", request, prompt_ids, adapter)
        stream = self._submit(gen)
        if request.stream:
            return _sse(self._chat_events(request, gen, stream, sources))
        text, final = await self._collect(stream, request.model)
        return ChatCompletionResponse(
            id=gen.request_id,
            model=request.model,
            system_fingerprint=self.system_fingerprint,
            choices=[
                ChatChoice(message=ResponseMessage(content=text), finish_reason=final.finish_reason)
            ],
            usage=Usage.of(final.prompt_tokens, final.completion_tokens),
            sources=sources,
        )

    async def create_completion(self, request: CompletionRequest) -> Any:
        request.unsupported()
        adapter = await self.resolve_adapter(request.model)
        prompt = request.prompt_text_or_ids()
        sources = None
        if (options := request.rag_options()) is not None:
            if not isinstance(prompt, str):
                raise BadRequestError("rag needs a text prompt, not token ids", "prompt")
            prompt, sources = await self._retrieve(options, prompt, request.model)
        if isinstance(prompt, str):
            prompt_ids = encode_prompt(self.tokenizer, prompt)
        else:
            vocab = len(self.tokenizer)
            if any(not 0 <= t < vocab for t in prompt):
                raise BadRequestError(f"prompt token ids must be in [0, {vocab})", "prompt")
            prompt_ids = list(prompt)
        gen = self._engine_request("cmpl", request, prompt_ids, adapter)
        stream = self._submit(gen)
        if request.stream:
            return _sse(self._completion_events(request, gen, stream, sources))
        text, final = await self._collect(stream, request.model)
        return CompletionResponse(
            id=gen.request_id,
            model=request.model,
            system_fingerprint=self.system_fingerprint,
            choices=[CompletionChoice(text=text, finish_reason=final.finish_reason)],
            usage=Usage.of(final.prompt_tokens, final.completion_tokens),
            sources=sources,
        )

    async def create_embeddings(self, request: EmbeddingRequest) -> EmbeddingResponse:
        service = self.retrieval_service()
        if request.model != service.embedder_name:
            raise NotFoundError(
                f"embedding model {request.model!r} is not served; use {service.embedder_name!r}",
                "model",
                code="model_not_found",
            )
        texts = request.texts()
        if request.dimensions is not None and request.dimensions != service.embedder.dim:
            raise BadRequestError(
                f"this embedder has {service.embedder.dim} dimensions", "dimensions"
            )
        vectors, tokens = await run_blocking(service.embed, texts)
        data = [
            EmbeddingData(
                index=i,
                embedding=(
                    base64.b64encode(v.astype("<f4").tobytes()).decode()
                    if request.encoding_format == "base64"
                    else v.tolist()
                ),
            )
            for i, v in enumerate(vectors)
        ]
        return EmbeddingResponse(
            data=data,
            model=service.embedder_name,
            usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens),
        )

    # ----------------------------------------------------------------------------- retrieval
    def retrieval_service(self) -> RetrievalService:
        if self.retrieval is None:
            raise ServiceUnavailableError(
                "retrieval is unavailable on this server; see its log", code="retrieval_unavailable"
            )
        return self.retrieval

    async def _retrieve(
        self, options: RagOptions, question: str, model: str
    ) -> tuple[str, list[Source]]:
        service = self.retrieval_service()
        adapter_index = self.registry.default_index(model) if model != self.base_model_id else None
        started = time.perf_counter()
        result = await run_blocking(service.retrieve, options, question, adapter_index)
        mode = options.mode or service.config.default_mode
        self.metrics.retrieval_latency.labels(mode).observe(time.perf_counter() - started)
        return result

    # ------------------------------------------------------------------------------- helpers
    def _engine_request(
        self,
        prefix: str,
        request: _GenerationRequest,
        prompt_ids: list[int],
        adapter: AdapterWeights | None,
    ) -> GenerationRequest:
        limits = self.settings.limits
        if not prompt_ids:
            raise BadRequestError(
                "the prompt is empty", "messages" if prefix == "chatcmpl" else "prompt"
            )
        max_prompt = min(limits.max_prompt_tokens, self.context_length - 1)
        if len(prompt_ids) > max_prompt:
            raise BadRequestError(
                f"the prompt has {len(prompt_ids)} tokens but this server accepts at most "
                f"{max_prompt} (limits.max_prompt_tokens); shorten the prompt",
                "messages" if prefix == "chatcmpl" else "prompt",
                code="context_length_exceeded",
            )
        room = self.context_length - len(prompt_ids)
        wanted = request.requested_max_tokens()
        if wanted is None:
            wanted = min(limits.max_new_tokens, room)
        elif not {"max_tokens", "max_completion_tokens"} & request.model_fields_set:
            wanted = min(wanted, limits.max_new_tokens, room)  # a default, not the client's ask
        elif wanted > limits.max_new_tokens:
            raise BadRequestError(
                f"max_tokens={wanted} exceeds this server's limit of {limits.max_new_tokens} "
                "(limits.max_new_tokens)",
                "max_tokens",
            )
        elif wanted > room:
            raise BadRequestError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({wanted}) exceeds the "
                f"{self.context_length}-token sequence limit (engine.max_seq_len)",
                "max_tokens",
                code="context_length_exceeded",
            )
        return GenerationRequest(
            request_id=new_id(prefix),
            prompt_ids=prompt_ids,
            params=request.to_sampling_params(wanted),
            adapter=adapter,
        )

    def _submit(self, gen: GenerationRequest) -> RequestStream:
        try:
            return self.engine.submit(gen)
        except Exception as exc:
            raise to_api_error(exc) from exc

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

    async def _collect(self, stream: RequestStream, model: str) -> tuple[str, StepOutput]:
        parts: list[str] = []
        final = StepOutput()
        async for output in self._outputs(stream, model):
            parts.append(output.text)
            final = output
        return "".join(parts), final

    async def _chat_events(
        self,
        request: ChatCompletionRequest,
        gen: GenerationRequest,
        stream: RequestStream,
        sources: list[Source] | None,
    ) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(delta: DeltaMessage, finish: str | None = None) -> str:
            return _event(
                ChatCompletionChunk(
                    id=gen.request_id,
                    created=created,
                    model=request.model,
                    system_fingerprint=self.system_fingerprint,
                    choices=[ChatChunkChoice(delta=delta, finish_reason=finish)],
                )
            )

        yield _event(
            ChatCompletionChunk(
                id=gen.request_id,
                created=created,
                model=request.model,
                system_fingerprint=self.system_fingerprint,
                choices=[ChatChunkChoice(delta=DeltaMessage(role="assistant", content=""))],
                sources=sources,
            )
        )
        try:
            async for output in self._outputs(stream, request.model):
                if output.text or output.finished:
                    yield chunk(DeltaMessage(content=output.text or None), output.finish_reason)
                if output.finished and request.include_usage:
                    yield _event(
                        ChatCompletionChunk(
                            id=gen.request_id,
                            created=created,
                            model=request.model,
                            system_fingerprint=self.system_fingerprint,
                            choices=[],
                            usage=Usage.of(output.prompt_tokens, output.completion_tokens),
                        )
                    )
        except Exception as exc:
            yield sse_error(to_api_error(exc))
        yield "data: [DONE]\n\n"

    async def _completion_events(
        self,
        request: CompletionRequest,
        gen: GenerationRequest,
        stream: RequestStream,
        sources: list[Source] | None,
    ) -> AsyncIterator[str]:
        created = int(time.time())
        if sources is not None:  # citations come first, before any text
            yield _event(
                CompletionResponse(
                    id=gen.request_id,
                    created=created,
                    model=request.model,
                    system_fingerprint=self.system_fingerprint,
                    choices=[CompletionChoice(text="", finish_reason=None)],
                    sources=sources,
                )
            )
        try:
            async for output in self._outputs(stream, request.model):
                if output.text or output.finished:
                    yield _event(
                        CompletionResponse(
                            id=gen.request_id,
                            created=created,
                            model=request.model,
                            system_fingerprint=self.system_fingerprint,
                            choices=[
                                CompletionChoice(
                                    text=output.text, finish_reason=output.finish_reason
                                )
                            ],
                        )
                    )
                if output.finished and request.include_usage:
                    yield _event(
                        CompletionResponse(
                            id=gen.request_id,
                            created=created,
                            model=request.model,
                            system_fingerprint=self.system_fingerprint,
                            choices=[],
                            usage=Usage.of(output.prompt_tokens, output.completion_tokens),
                        )
                    )
        except Exception as exc:
            yield sse_error(to_api_error(exc))
        yield "data: [DONE]\n\n"


def _event(model: Any) -> str:
    return f"data: {model.model_dump_json(exclude_none=True)}\n\n"


def _sse(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
