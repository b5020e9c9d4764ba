"""HTTP routes. Thin: authenticate, parse into protocol models, call the serving layer."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ragtune import __version__
from ragtune.audit import AuditLog
from ragtune.config import Settings
from server.adapters.loader import BaseSpec
from server.adapters.registry import AdapterRegistry
from server.admin import admin_router
from server.attribution import HEADER as SERVED_HEADER
from server.attribution import begin as begin_attribution
from server.attribution import end as end_attribution
from server.auth import KeyStore
from server.canary import CanaryRouter
from server.chat_protocol import ChatCompletionRequest
from server.completion_protocol import CompletionRequest
from server.embedding_protocol import EmbeddingRequest, EmbeddingResponse
from server.errors import ServiceUnavailableError, error_response, install_error_handlers
from server.feedback import FeedbackService, feedback_router
from server.logs import request_id
from server.metrics import UNKNOWN_MODEL, Metrics
from server.middleware import BodySizeLimit, HTTPOnly
from server.protocol import ErrorResponse, ModelCard, ModelList
from server.serving import OpenAIServing
from server.store_sync import StoreSync, store_settings
from server.tenancy import bind_tenant, reset_tenant
from server.tokenizer_routes import tokenizer_router

logger = logging.getLogger(__name__)

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 503)
}

# JSON, or server-sent events with `stream: true`
GENERATION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/json": {}, "text/event-stream": {}}}
}


@dataclass
class ServerState:
    """What the routes need; filled in by the background loader."""

    settings: Settings
    keys: KeyStore
    audit: AuditLog
    metrics: Metrics
    serving: OpenAIServing | None = None
    load_error: str | None = None
    draining: bool = False  # set on SIGTERM: finish in-flight work, refuse new requests
    loaded: threading.Event = field(default_factory=threading.Event)
    replica_id: str | None = None  # a Ray Serve replica's id, sent as X-Ragtune-Replica
    store_sync: StoreSync | None = None  # set when a shared store is configured
    feedback: FeedbackService | None = None  # POST /v1/feedback and the response ledger
    canary: CanaryRouter | None = None  # canary splits and per-version counters
    # called as listener(adapter, version, rating) for every rating POST /v1/feedback records
    rating_listeners: list[Callable[[str, str, str], None]] = field(default_factory=list)

    def require_serving(self) -> OpenAIServing:
        if self.serving is None:
            reason = self.load_error or "the model is still loading; poll GET /ready"
            raise ServiceUnavailableError(reason)
        return self.serving


def _load(state: ServerState) -> None:
    """Runs on a worker thread: the event loop answers /health while the model loads."""
    from ragtune.cpu_share import gemms_exact_at_any_thread_count
    from server.engine import Engine
    from server.engine.loading import load_for_engine

    try:
        settings = state.settings
        if settings.model.threads == "auto":  # the engine's team may be resized
            gemms_exact_at_any_thread_count()
        loaded, max_seq_len = load_for_engine(settings)
        engine = Engine(
            loaded, settings.engine, settings.limits.max_queue, max_seq_len, settings.model.threads
        )
        registry = build_registry(settings, engine)
        if settings.store.url is not None:  # follow the shared store from the start
            state.store_sync = StoreSync(settings, registry)
            state.store_sync.pull()
        registry.on_event = lambda event, result: state.metrics.adapter_events.labels(
            event, result
        ).inc()
        for name, path in settings.adapters.preload.items():
            entry = registry.load(name, path)
            state.metrics.adapter_events.labels("load", "ok").inc()
            state.audit.record(
                None,
                "preload_adapter",
                "ok",
                adapter=name,
                version=entry.version,
                path=str(entry.path),
            )
        state.metrics.watch_engine(engine)
        engine.scheduler.on_batch = state.metrics.batch_size.observe
        engine.start()
        retrieval = _retrieval_service(settings)
        if state.store_sync is not None:
            state.store_sync.attach_indexes(retrieval.store if retrieval else None)
            state.store_sync.start()
        state.serving = OpenAIServing(engine, settings, registry, state.metrics, retrieval)
        state.serving.feedback = state.feedback
        state.serving.canary = state.canary
        if state.store_sync is not None:
            state.serving.catch_up = state.store_sync.catch_up
        logger.info("ready: serving %s", settings.model.served_model_name)
    except Exception as exc:
        logger.exception("model failed to load")
        state.load_error = f"model failed to load: {type(exc).__name__}: {exc}"
    finally:
        state.loaded.set()


def _retrieval_service(settings: Settings):
    """The retrieval backend, or None (RAG and embeddings answer 503) if it cannot start."""
    from server.rag import RetrievalService

    try:
        return RetrievalService(settings.retrieval, settings.home)
    except Exception:
        logger.exception("retrieval is unavailable")
        return None


def build_registry(settings: Settings, engine) -> AdapterRegistry:
    from server.engine.runner import CompactRunner

    runner = engine.runner
    batched = isinstance(runner, CompactRunner)
    spec = BaseSpec(
        fingerprint=engine.loaded.fingerprint,
        num_layers=runner.model.num_layers if batched else 0,
        module_shapes=runner.module_shapes if batched else {},
        max_rank=settings.engine.max_lora_rank,
        dtype=engine.loaded.dtype,
        supports_lora=batched,
    )
    for root in settings.adapter_roots():
        root.mkdir(parents=True, exist_ok=True)
    return AdapterRegistry(
        spec,
        settings.adapter_roots(),
        settings.adapters.max_cpu_loras,
        settings.model.served_model_name,
    )


def create_app(settings: Settings, replica_id: str | None = None) -> FastAPI:
    settings = store_settings(settings)
    state = ServerState(
        settings=settings,
        keys=KeyStore(settings.api_keys, settings.admin_keys, settings.api_key_file),
        audit=AuditLog(settings.audit_path()),
        metrics=Metrics(replica_id),
        replica_id=replica_id,
    )
    state.feedback = FeedbackService(
        settings.feedback,
        settings.home,
        state.metrics,
        state.audit,
        settings.model.served_model_name,
        state.rating_listeners,
    )
    state.canary = CanaryRouter(settings.canary, state.metrics, state.audit)
    state.rating_listeners.append(state.canary.observe_rating)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = threading.Thread(target=_load, args=(state,), name="ragtune-loader", daemon=True)
        loader.start()
        yield
        await asyncio.to_thread(state.loaded.wait)
        if state.store_sync is not None:
            state.store_sync.stop()
        if state.serving is not None:
            await asyncio.to_thread(
                state.serving.engine.shutdown, settings.limits.request_timeout_s
            )

    app = FastAPI(
        title="ragtune",
        version=__version__,
        lifespan=lifespan,
    )
    app.state.ragtune = state
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.limits.max_body_bytes)

    def require_client(request: Request) -> str | None:
        return state.keys.check_client(request)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", responses={503: {"model": ErrorResponse}})
    async def ready() -> JSONResponse:
        if state.draining:
            raise ServiceUnavailableError("the server is shutting down", code="shutting_down")
        if state.serving is None:
            raise ServiceUnavailableError(state.load_error or "model is loading")
        return JSONResponse({"status": "ready", "model": settings.model.served_model_name})

    async def request_context(scope: Scope, receive: Receive, send: Send, app: ASGIApp) -> None:
        """Request id (the client's X-Request-ID is kept), in logs and the response; metrics."""
        headers = Headers(scope=scope)
        rid = headers.get("x-request-id", "")[:128].strip() or uuid.uuid4().hex
        status = 500  # if the app raises before it answers
        started = time.perf_counter()
        served, served_token = begin_attribution()  # which adapter version answers

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)["X-Request-ID"] = rid
                if state.replica_id:
                    MutableHeaders(scope=message)["X-Ragtune-Replica"] = state.replica_id
                if served.model_id:
                    MutableHeaders(scope=message)[SERVED_HEADER] = served.model_id
            await send(message)

        token = request_id.set(rid)
        tenant = bind_tenant(headers.get("authorization"), settings.serve)
        try:
            if state.draining and scope["path"] != "/health":
                response = error_response(
                    ServiceUnavailableError("the server is shutting down", code="shutting_down")
                )
                response.headers["Connection"] = "close"
                await response(scope, receive, send_with_id)
            else:
                await app(scope, receive, send_with_id)
        finally:
            request_id.reset(token)
            reset_tenant(tenant)
            end_attribution(served_token)
            if served.adapter and state.canary is not None:
                ok = status < 500 and not served.failed
                latency = time.perf_counter() - started
                state.canary.observe_response(served.adapter, served.version, ok, latency)
            route = scope.get("route")
            model = (scope.get("state") or {}).get("model")
            state.metrics.requests.labels(
                getattr(route, "path", "unmatched"), _model_label(state, model), str(status)
            ).inc()

    # outermost, and plain ASGI: Starlette's BaseHTTPMiddleware (`@app.middleware`) relays
    # every chunk of a streamed response through a memory stream and a task of its own
    app.add_middleware(HTTPOnly, handler=request_context)

    @app.get("/metrics", dependencies=[Depends(require_client)], response_class=PlainTextResponse)
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_client)], responses=ERROR_RESPONSES)

    @v1.get("/models", response_model=ModelList)
    async def list_models() -> ModelList:
        serving = state.require_serving()
        base = serving.base_model_id
        kernels = serving.engine.runner.kernels()
        runner = kernels["runner"] + (f":{kernels['family']}" if "family" in kernels else "")
        cards = [ModelCard(id=base, root=str(serving.engine.loaded.model_dir), runner=runner)]
        for adapter in serving.registry.describe():
            name = adapter["name"]
            active = next(
                v for v in adapter["versions"] if v["version"] == adapter["active_version"]
            )
            cards.append(ModelCard(id=name, root=active["path"], parent=base))
            cards += [
                ModelCard(id=f"{name}@{v['version']}", root=v["path"], parent=base)
                for v in adapter["versions"]
            ]
        return ModelList(data=cards)

    @v1.post("/chat/completions", responses=GENERATION_RESPONSES)
    async def chat_completions(
        body: ChatCompletionRequest, request: Request, key_id: str | None = Depends(require_client)
    ) -> Any:
        request.state.model = body.model
        return await state.require_serving().create_chat_completion(body, key_id)

    @v1.post("/completions", responses=GENERATION_RESPONSES)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        request.state.model = body.model
        return await state.require_serving().create_completion(body)

    @v1.post("/embeddings", response_model=EmbeddingResponse)
    async def embeddings(body: EmbeddingRequest, request: Request) -> EmbeddingResponse:
        request.state.model = body.model
        return await state.require_serving().create_embeddings(body)

    @v1.get("/indexes")
    async def list_indexes() -> dict[str, Any]:
        """Indexes a request may name in `rag.index`; unusable ones are listed with why."""
        service = state.require_serving().retrieval_service()
        return {"object": "list", "data": await asyncio.to_thread(service.list_indexes)}

    app.include_router(v1)
    app.include_router(tokenizer_router(require_client, state.require_serving, ERROR_RESPONSES))
    app.include_router(admin_router(state))
    app.include_router(feedback_router(state.feedback, require_client))
    return app


def _model_label(state: ServerState, model: str | None) -> str:
    """The `model` a request named, if it is served; "unknown" otherwise (bounded labels)."""
    if model is None:
        return ""
    serving = state.serving
    if serving is None or model not in serving.served_ids():
        return UNKNOWN_MODEL
    return model
