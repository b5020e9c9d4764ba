"""Serving logic for /v1/chat/completions and /v1/completions: validate against the limits,
turn the request into engine requests (one per choice), and shape engine output as OpenAI JSON
(streams: server/streaming.py)."""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

from ragtune.config import Settings
from ragtune.models.chat import encode_prompt, render_chat
from server.adapters.errors import AdapterNotFoundError
from server.adapters.registry import AdapterRegistry
from server.attribution import note_adapter
from server.canary import CanaryRouter
from server.choices import (
    ChoiceResult,
    Echo,
    child_seed,
    merged,
    total_completion_tokens,
    total_prompt_tokens,
)
from server.engine import Engine, GenerationRequest, RequestStream, StepOutput
from server.engine.grammar import GrammarCompiler, GrammarError, GrammarSpec
from server.engine.lora import AdapterWeights
from server.errors import (
    APIError,
    BadRequestError,
    InternalError,
    ModelNotFoundError,
    NotFoundError,
    ServiceUnavailableError,
    to_api_error,
)
from server.feedback import FeedbackService
from server.logprobs import TokenTexts, chat_content, choice_logprobs
from server.metrics import Metrics
from server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    RagOptions,
    Source,
    _GenerationRequest,
    new_id,
)
from server.rag import RetrievalService
from server.responses import (
    ChatChoice,
    ChatChoiceLogprobs,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionResponse,
    ResponseMessage,
    Usage,
)
from server.streaming import chat_events, completion_events, sse
from server.structured import response_grammar
from server.tenancy import cache_namespace
from server.threads import run_blocking
from server.tools import (
    finish_reply,
    template_takes_tools,
    tool_conversation,
    tool_grammar,
)


class RequestTimeoutError(APIError):
    status_code = 504
    error_type = "timeout_error"
    code = "request_timeout"


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
        self._grammars: GrammarCompiler | None = None  # built on the first structured request
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
        grammar = await self.compile_grammar(spec)
        response_id, gens = self._engine_requests(
            "chatcmpl", request, prompt_ids, adapter, grammar=grammar
        )
        streams = self._submit(gens)
        if self.feedback is not None:  # the ledger (and the conversation, when kept)
            streams = self.feedback.track(response_id, request, adapter, key_id, streams)
        if request.stream:
            return sse(chat_events(self, request, response_id, streams, sources))
        results = await self._collect(streams, request.model)
        return ChatCompletionResponse(
            id=response_id,
            model=request.model,
            system_fingerprint=self.system_fingerprint,
            choices=[self._chat_choice(request, i, result) for i, result in enumerate(results)],
            usage=_usage(results),
            sources=sources,
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
                self._check_token_ids("prompt", prompt)
                prompt_ids = list(prompt)
            tag = f"{response_id}-{number}" if len(prompts) > 1 else response_id
            _, choices = self._engine_requests("cmpl", request, prompt_ids, adapter, tag)
            gens += choices
            if request.echo:
                text = prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt_ids)
                echoes += [Echo(text, prompt_ids)] * len(choices)
        streams = self._submit(gens)
        if request.stream:
            return sse(completion_events(self, request, response_id, streams, sources, echoes))
        results = await self._collect(streams, request.model)
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
            usage=_usage(results, request.n),
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
    def _check_token_ids(self, param: str, ids: list[int]) -> None:
        vocab = len(self.tokenizer)
        if any(not 0 <= t < vocab for t in ids):
            raise BadRequestError(f"{param} token ids must be in [0, {vocab})", param)

    def _engine_requests(
        self,
        prefix: str,
        request: _GenerationRequest,
        prompt_ids: list[int],
        adapter: AdapterWeights | None,
        response_id: str | None = None,  # default: a new one
        grammar: Any = None,  # compiled (see compile_grammar)
    ) -> tuple[str, list[GenerationRequest]]:
        """The response id and one engine request per choice (`n`), within the limits."""
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
        for param, ids in request.token_ids().items():
            self._check_token_ids(param, ids)
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
        params = request.to_sampling_params(wanted)
        response_id = response_id or new_id(prefix)
        namespace = cache_namespace(request.cache_salt)
        if request.n == 1:
            return response_id, [
                GenerationRequest(response_id, prompt_ids, params, adapter, grammar, namespace)
            ]
        return response_id, [
            GenerationRequest(
                f"{response_id}-{i}",
                prompt_ids,
                replace(params, seed=child_seed(params.seed, i)),
                adapter,
                grammar,
                namespace,
            )
            for i in range(request.n)
        ]

    async def compile_grammar(self, spec: GrammarSpec | None) -> Any:
        """The compiled grammar for a request's structured output (None: free text); a schema
        the grammar library cannot compile is a 400 naming the problem. The vocabulary table
        is built on first use (seconds for a 262k vocabulary), off the event loop."""
        if spec is None:
            return None
        if self._grammars is None:
            loaded = self.engine.loaded
            vocab = loaded.model.config.get_text_config().vocab_size
            self._grammars = await run_blocking(
                GrammarCompiler, self.tokenizer, vocab, self.engine.eos_ids
            )
        try:
            return await run_blocking(self._grammars.compile, spec)
        except GrammarError as exc:
            raise BadRequestError(f"cannot follow this schema: {exc}", "response_format") from None

    def _submit(self, gens: list[GenerationRequest]) -> list[RequestStream]:
        """All choices or none: a refusal (queue full, shutting down) cancels those queued."""
        streams: list[RequestStream] = []
        try:
            for gen in gens:
                streams.append(self.engine.submit(gen))
        except Exception as exc:
            for stream in streams:
                stream.cancel()
            raise to_api_error(exc) from exc
        return streams

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

    async def _collect(self, streams: list[RequestStream], model: str) -> list[ChoiceResult]:
        results = [ChoiceResult() for _ in streams]
        async for index, output in self.choice_outputs(streams, model):
            results[index].add(output)
        return results


def _native_tools(tools: list | None, native: bool) -> list[dict] | None:
    """Tools for a chat template that takes them (see server/tools.py)."""
    if not tools or not native:
        return None
    return [tool.model_dump(exclude_none=True) for tool in tools]


def _usage(results: list[ChoiceResult], n: int = 1) -> Usage:
    finals = [result.final for result in results]
    return Usage.of(total_prompt_tokens(finals, n), total_completion_tokens(finals))
