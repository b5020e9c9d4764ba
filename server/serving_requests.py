"""A validated generation request as engine requests: the server's limits (prompt length,
max_tokens against the context), the token ids it names, one engine request per choice (`n`)
with its compiled grammar, and their all-or-none submission to the engine."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ragtune.config import Settings
from server.choices import child_seed
from server.engine import Engine, GenerationRequest, RequestStream
from server.engine.grammar import GrammarCompiler, GrammarError, GrammarSpec
from server.engine.lora import AdapterWeights
from server.errors import BadRequestError, to_api_error
from server.protocol import _GenerationRequest, new_id
from server.tenancy import cache_namespace
from server.threads import run_blocking


class RequestBuilder:
    """Engine requests for OpenAIServing (server/serving.py); holds the grammar compiler, built
    on the first structured request."""

    def __init__(self, engine: Engine, settings: Settings):
        self.engine = engine
        self.settings = settings
        self.tokenizer = engine.tokenizer
        self.context_length = engine.max_seq_len
        self._grammars: GrammarCompiler | None = None  # built on the first structured request
        # asked once: len() of a fast tokenizer builds its whole vocabulary (Gemma 3's 262k
        # entries: 0.2-1 ms of the event loop's time a request)
        self.vocab_size = len(self.tokenizer)

    def check_token_ids(self, param: str, ids: list[int]) -> None:
        vocab = self.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise BadRequestError(f"{param} token ids must be in [0, {vocab})", param)

    def engine_requests(
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
            self.check_token_ids(param, ids)
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

    def submit(self, gens: list[GenerationRequest]) -> list[RequestStream]:
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
