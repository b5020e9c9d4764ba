"""vLLM-compatible tokenizer routes at the server root: `POST /tokenize`, `POST /detokenize`,
`GET /tokenizer_info` (client scope). lm-evaluation-harness's `local-completions` model finds
them from its `base_url` and tokenizes through them (`tokenizer_backend=remote`), so its
token counts and ids are the server's own."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends

from ragtune.models.chat import render_chat
from server.chat_protocol import conversation
from server.errors import BadRequestError, ModelNotFoundError
from server.tokenizer_protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfoResponse,
)

if TYPE_CHECKING:
    from server.serving import OpenAIServing


def tokenize(serving: OpenAIServing, request: TokenizeRequest) -> TokenizeResponse:
    """The ids a completion (`prompt`) or chat request (`messages`) would be given: messages
    go through the same chat template, so `count` equals the chat request's prompt_tokens."""
    request.check()
    _check_model(serving, request.model)
    tokenizer = serving.tokenizer
    if request.messages is not None:
        generation_prompt = request.add_generation_prompt is not False
        text = render_chat(tokenizer, conversation(request.messages), generation_prompt)
        special = bool(request.add_special_tokens)
    else:
        text = request.prompt or ""
        special = request.add_special_tokens is not False
    ids = tokenizer(text, add_special_tokens=special)["input_ids"]
    return TokenizeResponse(
        count=len(ids),
        max_model_len=serving.context_length,
        tokens=ids,
        token_strs=tokenizer.convert_ids_to_tokens(ids) if request.return_token_strs else None,
    )


def detokenize(serving: OpenAIServing, request: DetokenizeRequest) -> DetokenizeResponse:
    _check_model(serving, request.model)
    vocab = len(serving.tokenizer)
    if any(not 0 <= t < vocab for t in request.tokens):
        raise BadRequestError(f"token ids must be in [0, {vocab})", "tokens")
    return DetokenizeResponse(prompt=serving.tokenizer.decode(request.tokens))


def tokenizer_info(serving: OpenAIServing) -> TokenizerInfoResponse:
    tokenizer = serving.tokenizer
    return TokenizerInfoResponse(
        tokenizer_class=type(tokenizer).__name__,
        eos_token=tokenizer.eos_token,
        bos_token=tokenizer.bos_token,
        pad_token=tokenizer.pad_token,
        unk_token=tokenizer.unk_token,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        vocab_size=len(tokenizer),
        model_max_length=serving.context_length,
        chat_template=getattr(tokenizer, "chat_template", None),
    )


def _check_model(serving: OpenAIServing, model: str | None) -> None:
    """Adapters share the base model's tokenizer; a name that is not served is a 404."""
    if model is not None and model not in serving.model_ids():
        raise ModelNotFoundError(model, serving.model_ids())


def tokenizer_router(
    require_client: Callable[..., Any],
    require_serving: Callable[[], OpenAIServing],
    responses: dict[int | str, dict[str, Any]],
) -> APIRouter:
    router = APIRouter(dependencies=[Depends(require_client)], responses=responses)

    @router.post("/tokenize", response_model=TokenizeResponse)
    async def tokenize_route(body: TokenizeRequest) -> TokenizeResponse:
        return tokenize(require_serving(), body)

    @router.post("/detokenize", response_model=DetokenizeResponse)
    async def detokenize_route(body: DetokenizeRequest) -> DetokenizeResponse:
        return detokenize(require_serving(), body)

    @router.get("/tokenizer_info", response_model=TokenizerInfoResponse)
    async def tokenizer_info_route() -> TokenizerInfoResponse:
        return tokenizer_info(require_serving())

    return router
