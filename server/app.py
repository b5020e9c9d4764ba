"""HTTP routes. Thin: authenticate, parse into protocol models, call the serving layer."""

from __future__ import annotations

import asyncio
import logging
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from ragtune import __version__
from ragtune.config import Settings
from server.auth import KeyStore
from server.errors import ServiceUnavailableError, install_error_handlers
from server.middleware import BodySizeLimit
from server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
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
        engine = Engine(loaded, settings.engine, settings.limits.max_queue)
        engine.start()
        state.serving = OpenAIServing(engine, settings)
        logger.info("ready: serving %s", settings.model.served_model_name)
    except Exception as exc:
        logger.exception("model failed to load")
        state.load_error = f"model failed to load: {type(exc).__name__}: {exc}"
    finally:
        state.loaded.set()


def create_app(settings: Settings) -> FastAPI:
    state = ServerState(settings=settings, keys=KeyStore(settings.api_keys, settings.admin_keys))

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

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_client)], responses=ERROR_RESPONSES)

    @v1.get("/models", response_model=ModelList)
    async def list_models() -> ModelList:
        serving = state.require_serving()
        base = serving.base_model_id
        return ModelList(data=[ModelCard(id=base, root=str(serving.engine.loaded.model_dir))])

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest) -> Any:
        return await state.require_serving().create_chat_completion(body)

    @v1.post("/completions")
    async def completions(body: CompletionRequest) -> Any:
        return await state.require_serving().create_completion(body)

    app.include_router(v1)
    return app
