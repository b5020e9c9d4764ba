"""HTTP routes. Thin: authenticate, parse into protocol models, call the serving layer."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from ragtune import __version__
from ragtune.config import Settings
from server.adapters.audit import AuditLog
from server.adapters.loader import BaseSpec
from server.adapters.registry import AdapterRegistry
from server.auth import KeyStore
from server.errors import ServiceUnavailableError, install_error_handlers
from server.logs import request_id
from server.metrics import Metrics
from server.middleware import BodySizeLimit
from server.protocol import (
    ActivateAdapterRequest,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorResponse,
    LoadLoraAdapterRequest,
    ModelCard,
    ModelList,
    UnloadLoraAdapterRequest,
)
from server.serving import OpenAIServing

logger = logging.getLogger(__name__)

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 503)
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
    loaded: threading.Event = field(default_factory=threading.Event)

    def require_serving(self) -> OpenAIServing:
        if self.serving is None:
            reason = self.load_error or "the model is still loading; poll GET /ready"
            raise ServiceUnavailableError(reason)
        return self.serving


def _load(state: ServerState) -> None:
    """Runs on a worker thread: the event loop answers /health while the model loads."""
    from ragtune.models import load_base_model
    from server.engine import Engine

    try:
        settings = state.settings
        loaded = load_base_model(settings.model, settings.home)
        limits = settings.limits
        max_seq_len = min(
            settings.engine.max_seq_len or limits.max_prompt_tokens + limits.max_new_tokens,
            loaded.context_length,
        )
        engine = Engine(loaded, settings.engine, limits.max_queue, max_seq_len)
        registry = build_registry(settings, engine)
        for name, path in settings.adapters.preload.items():
            entry = registry.load(name, path)
            state.audit.record(
                None,
                "preload_adapter",
                "ok",
                adapter=name,
                version=entry.version,
                path=str(entry.path),
            )
        engine.start()
        state.metrics.watch_engine(lambda: engine.num_running, lambda: engine.num_waiting)
        state.serving = OpenAIServing(
            engine, settings, registry, state.metrics, _retrieval_service(settings)
        )
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
    from server.engine.runner import LlamaRunner

    runner = engine.runner
    batched = isinstance(runner, LlamaRunner)
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


def create_app(settings: Settings) -> FastAPI:
    state = ServerState(
        settings=settings,
        keys=KeyStore(settings.api_keys, settings.admin_keys),
        audit=AuditLog(settings.audit_path()),
        metrics=Metrics(),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = threading.Thread(target=_load, args=(state,), name="ragtune-loader", daemon=True)
        loader.start()
        yield
        await asyncio.to_thread(state.loaded.wait)
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
        if state.serving is None:
            raise ServiceUnavailableError(state.load_error or "model is loading")
        return JSONResponse({"status": "ready", "model": settings.model.served_model_name})

    @app.middleware("http")
    async def request_context(request: Request, call_next):
        """Request id (the client's X-Request-ID is kept), in logs and the response; metrics."""
        rid = request.headers.get("x-request-id", "")[:128].strip() or uuid.uuid4().hex
        token = request_id.set(rid)
        try:
            response = await call_next(request)
        finally:
            request_id.reset(token)
        response.headers["X-Request-ID"] = rid
        route = request.scope.get("route")
        state.metrics.requests.labels(
            getattr(route, "path", "unmatched"), str(response.status_code)
        ).inc()
        return response

    @app.get("/metrics", dependencies=[Depends(require_client)])
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_client)], responses=ERROR_RESPONSES)

    @v1.get("/models", response_model=ModelList)
    async def list_models() -> ModelList:
        serving = state.require_serving()
        base = serving.base_model_id
        cards = [ModelCard(id=base, root=str(serving.engine.loaded.model_dir))]
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

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest) -> Any:
        return await state.require_serving().create_chat_completion(body)

    @v1.post("/completions")
    async def completions(body: CompletionRequest) -> Any:
        return await state.require_serving().create_completion(body)

    @v1.post("/embeddings", response_model=EmbeddingResponse)
    async def embeddings(body: EmbeddingRequest) -> EmbeddingResponse:
        return await state.require_serving().create_embeddings(body)

    app.include_router(v1)
    app.include_router(admin_router(state))
    return app


def admin_router(state: ServerState) -> APIRouter:
    """Adapter management; admin scope only, every action audited (success or failure)."""

    def require_admin(request: Request) -> str:
        return state.keys.check_admin(request)

    router = APIRouter(prefix="/v1", responses={**ERROR_RESPONSES, 403: {"model": ErrorResponse}})

    async def audited(key_id: str, action: str, fields: dict[str, Any], work) -> Any:
        serving = state.require_serving()
        try:
            result = await asyncio.to_thread(work, serving.registry)
        except Exception as exc:
            state.audit.record(key_id, action, "error", error=str(exc), **fields)
            raise
        state.audit.record(key_id, action, "ok", **{**fields, **result.get("audit", {})})
        result.pop("audit", None)
        return result

    @router.post("/load_lora_adapter")
    async def load_lora_adapter(
        body: LoadLoraAdapterRequest, key_id: str = Depends(require_admin)
    ) -> dict[str, Any]:
        def work(registry: AdapterRegistry) -> dict[str, Any]:
            started = time.perf_counter()
            entry = registry.load(
                body.lora_name, body.lora_path, body.version, body.replace, body.activate
            )
            load_ms = round((time.perf_counter() - started) * 1000, 1)
            return {
                "status": "ok",
                "lora_name": entry.name,
                "version": entry.version,
                "load_ms": load_ms,
                "audit": {"version": entry.version},
            }

        return await audited(
            key_id,
            "load_adapter",
            {"adapter": body.lora_name, "path": body.lora_path, "requested_version": body.version},
            work,
        )

    @router.post("/unload_lora_adapter")
    async def unload_lora_adapter(
        body: UnloadLoraAdapterRequest, key_id: str = Depends(require_admin)
    ) -> dict[str, Any]:
        def work(registry: AdapterRegistry) -> dict[str, Any]:
            versions = registry.unload(body.lora_name, body.version)
            return {
                "status": "ok",
                "lora_name": body.lora_name,
                "unloaded_versions": versions,
                "audit": {"version": ",".join(versions)},
            }

        return await audited(
            key_id, "unload_adapter", {"adapter": body.lora_name, "version": body.version}, work
        )

    @router.get("/adapters")
    async def list_adapters(_: str = Depends(require_admin)) -> dict[str, Any]:
        return {"object": "list", "data": state.require_serving().registry.describe()}

    @router.post("/adapters/{name}/activate")
    async def activate_adapter(
        name: str, body: ActivateAdapterRequest, key_id: str = Depends(require_admin)
    ) -> dict[str, Any]:
        def work(registry: AdapterRegistry) -> dict[str, Any]:
            entry = registry.activate(name, body.version)
            return {"status": "ok", "lora_name": name, "active_version": entry.version}

        return await audited(
            key_id, "activate_adapter", {"adapter": name, "version": body.version}, work
        )

    @router.post("/adapters/{name}/rollback")
    async def rollback_adapter(name: str, key_id: str = Depends(require_admin)) -> dict[str, Any]:
        def work(registry: AdapterRegistry) -> dict[str, Any]:
            entry = registry.rollback(name)
            return {
                "status": "ok",
                "lora_name": name,
                "active_version": entry.version,
                "audit": {"version": entry.version},
            }

        return await audited(key_id, "rollback_adapter", {"adapter": name}, work)

    return router
