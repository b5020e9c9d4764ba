"""Serving logic for /v1/chat/completions and /v1/completions: resolve the adapter, retrieve,
render the prompt, turn the request into engine requests (one per choice, within the limits:
server/serving_requests.py), and shape engine output (server/serving_outputs.py) as OpenAI
JSON (streams: server/streaming.py)."""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from ragtune.config import Settings
from ragtune.models.chat import encode_prompt, render_chat
from server.adapters.errors import AdapterNotFoundError
from server.adapters.registry import AdapterRegistry
from server.attribution import note_adapter
from server.canary import CanaryRouter
from server.chat_protocol import ChatCompletionRequest
from server.choices import (
    ChoiceResult,
    Echo,
)
from server.completion_protocol import CompletionRequest
from server.embedding_protocol import (
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
)
from server.engine import Engine, RequestStream, StepOutput
from server.engine.lora import AdapterWeights
from server.errors import (
    BadRequestError,
    ModelNotFoundError,
    NotFoundError,
    ServiceUnavailableError,
)
from server.feedback import FeedbackService
from server.logprobs import TokenTexts, chat_content, choice_logprobs, prompt_logprobs
from server.metrics import Metrics
from server.protocol import RagOptions, Source, new_id
from server.rag import RetrievalService
from server.responses import (
    ChatChoice,
    ChatChoiceLogprobs,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionResponse,
    ResponseMessage,
)
from server.serving_outputs import OutputCollector, usage_of
from server.serving_requests import RequestBuilder
from server.streaming import chat_events, completion_events, sse
from server.structured import response_grammar
from server.threads import run_blocking
from server.tools import (
    finish_reply,
    template_takes_tools,
    tool_conversation,
    tool_grammar,
)


class OpenAIServing:
    canary: CanaryRouter | None = None  # set by the app: canary splits of `name` requests

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
        self.token_texts = TokenTexts(self.tokenizer)
        self.requests = RequestBuilder(engine, settings)  # limits, choices, grammar, submission
        self.outputs = OutputCollector(metrics, settings)  # deadline, metrics, results
        self.feedback: FeedbackService | None = None  # set by the app: the response ledger
        # set by the app on a shared store: apply the store's newer state now
        self.catch_up: Callable[[], None] | None = None

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
            weights = await run_blocking(self._resolve, model)
        except AdapterNotFoundError:
            # Another server may have just loaded it (shared store): catch up, then decide
            if self.catch_up is None:
                raise ModelNotFoundError(model, self.model_ids()) from None
            await run_blocking(self.catch_up)
            try:
                weights = await run_blocking(self._resolve, model)
            except AdapterNotFoundError:
                raise ModelNotFoundError(model, self.model_ids()) from None
        note_adapter(weights.key)
        return weights

    def _resolve(self, model: str) -> AdapterWeights:
        if self.canary is None:
            return self.registry.resolve(model)
        return self.canary.resolve(model, self.registry.resolve)  # the canary's share

    # ------------------------------------------------------------------------------ requests
    async def create_chat_completion(
        self, request: ChatCompletionRequest, key_id: str | None = None
    ) -> Any:
        request.unsupported()
        adapter = await self.resolve_adapter(request.model)
        conversation = request.conversation()
        sources, rag_turn = None, None
        if (options := request.rag_options()) is not None:
            turn = next((m for m in reversed(conversation) if m["role"] == "user"), None)
            if turn is None:
                raise BadRequestError("rag needs a user message to search for", "messages")
            turn["content"], sources = await self._retrieve(options, turn["content"], request.model)
            rag_turn = turn["content"]
        spec = response_grammar(request.response_format)
        if request.uses_tools or any(m.role == "tool" or m.tool_calls for m in request.messages):
            choice = request.tool_choice_mode()
            native = template_takes_tools(self.tokenizer)
            tools = request.tools if choice.mode != "none" else None
            conversation = tool_conversation(request.messages, tools, native)
            if rag_turn is not None:  # the retrieved context stays in the last user turn
                last = next(t for t in reversed(conversation) if t["role"] == "user")
                last["content"] = rag_turn
            if tools:
                spec = tool_grammar(tools, choice, request.parallel_tool_calls is not False)
            text = render_chat(self.tokenizer, conversation, tools=_native_tools(tools, native))
        else:
            text = render_chat(self.tokenizer, conversation)
        prompt_ids = encode_prompt(self.tokenizer, text)
        grammar = await self.requests.compile_grammar(spec)
        response_id, gens = self.requests.engine_requests(
            "chatcmpl", request, prompt_ids, adapter, grammar=grammar
        )
        streams = self.requests.submit(gens)
        if self.feedback is not None:  # the ledger (and the conversation, when kept)
            streams = self.feedback.track(response_id, request, adapter, key_id, streams)
        if request.stream:
            return sse(chat_events(self, request, response_id, streams, sources))
        results = await self.outputs.collect(streams, request.model)
        return ChatCompletionResponse(
            id=response_id,
            model=request.model,
            system_fingerprint=self.system_fingerprint,
            choices=[self._chat_choice(request, i, result) for i, result in enumerate(results)],
            usage=usage_of(results),
            sources=sources,
            prompt_logprobs=(
                prompt_logprobs(results[0].prompt_logprobs or [], self.token_texts)
                if request.prompt_logprobs is not None
                else None
            ),
        )

    def _chat_choice(
        self, request: ChatCompletionRequest, index: int, result: ChoiceResult
    ) -> ChatChoice:
        content, calls, reason = result.text, None, result.final.finish_reason
        if request.uses_tools:
            forced = request.tool_choice_mode().mode in ("required", "function")
            content, calls, reason = finish_reply(content, reason, forced)
        return ChatChoice(
            index=index,
            message=ResponseMessage(content=content, tool_calls=calls),
            finish_reason=reason,
            logprobs=(
                ChatChoiceLogprobs(content=chat_content(result.logprobs, self.token_texts))
                if request.logprobs
                else None
            ),
        )

    async def create_completion(self, request: CompletionRequest) -> Any:
        request.unsupported()
        adapter = await self.resolve_adapter(request.model)
        prompts = request.prompts()
        sources = None
        if (options := request.rag_options()) is not None:
            if len(prompts) != 1 or not isinstance(prompts[0], str):
                raise BadRequestError("rag needs one text prompt", "prompt")
            text, sources = await self._retrieve(options, prompts[0], request.model)
            prompts = [text]
        response_id = new_id("cmpl")
        gens, echoes = [], []
        for number, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                prompt_ids = encode_prompt(self.tokenizer, prompt)
            else:
                self.requests.check_token_ids("prompt", prompt)
                prompt_ids = list(prompt)
            tag = f"{response_id}-{number}" if len(prompts) > 1 else response_id
            _, choices = self.requests.engine_requests("cmpl", request, prompt_ids, adapter, tag)
            gens += choices
            if request.echo:
                text = prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt_ids)
                echoes += [Echo(text, prompt_ids)] * len(choices)
        streams = self.requests.submit(gens)
        if request.stream:
            return sse(completion_events(self, request, response_id, streams, sources, echoes))
        results = await self.outputs.collect(streams, request.model)
        choices = []
        for i, result in enumerate(results):
            echo = echoes[i] if echoes else None
            text = result.text if echo is None else echo.text + result.text
            logprobs = None
            if request.logprobs is not None:
                logprobs = choice_logprobs(self.token_texts, result, echo)
            choices.append(
                CompletionChoice(
                    index=i, text=text, finish_reason=result.final.finish_reason, logprobs=logprobs
                )
            )
        return CompletionResponse(
            id=response_id,
            model=request.model,
            system_fingerprint=self.system_fingerprint,
            choices=choices,
            usage=usage_of(results, request.n),
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
    def choice_outputs(
        self, streams: list[RequestStream], model: str
    ) -> AsyncIterator[tuple[int, StepOutput]]:
        """Every choice's outputs as they arrive, tagged with the choice's index."""
        return self.outputs.choice_outputs(streams, model)


def _native_tools(tools: list | None, native: bool) -> list[dict] | None:
    """Tools for a chat template that takes them (see server/tools.py)."""
    if not tools or not native:
        return None
    return [tool.model_dump(exclude_none=True) for tool in tools]
