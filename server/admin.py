"""Admin routes: adapter and index changes. Admin scope only; every action is audited
(success or failure) without the key, by the key's id."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, Request

from server.adapters.registry import AdapterRegistry
from server.memory import release_free_memory
from server.protocol import (
    ActivateAdapterRequest,
    ErrorResponse,
    IndexSourcesRequest,
    LoadLoraAdapterRequest,
    UnloadLoraAdapterRequest,
)
from server.rag import RetrievalService
from server.threads import run_blocking

if TYPE_CHECKING:
    from server.app import ServerState

ADMIN_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 413, 503)
}


def admin_router(state: ServerState) -> APIRouter:
    def require_admin(request: Request) -> str:
        return state.keys.check_admin(request)

    router = APIRouter(prefix="/v1", responses=ADMIN_ERRORS)

    async def audited(key_id: str, action: str, fields: dict[str, Any], work: Callable) -> Any:
        """Run `work` on a worker thread and audit its outcome; `work` may return extra
        audit fields under the "audit" key (kept out of the response)."""
        try:
            result = await run_blocking(work)
        except Exception as exc:
            state.audit.record(key_id, action, "error", error=str(exc), **fields)
            raise
        state.audit.record(key_id, action, "ok", **{**fields, **result.pop("audit", {})})
        return result

    def registry() -> AdapterRegistry:
        return state.require_serving().registry

    def retrieval() -> RetrievalService:
        return state.require_serving().retrieval_service()

    def counted(event: str, work: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            try:
                result = work()
            except Exception:
                state.metrics.adapter_events.labels(event, "error").inc()
                raise
            state.metrics.adapter_events.labels(event, "ok").inc()
            return result

        return run

    # ---------------------------------------------------------------------------- adapters
    @router.post("/load_lora_adapter")
    async def load_lora_adapter(
        body: LoadLoraAdapterRequest, key_id: str = Depends(require_admin)
    ) -> dict[str, Any]:
        adapters = registry()

        def work() -> dict[str, Any]:
            started = time.perf_counter()
            entry = adapters.load(
                body.lora_name, body.lora_path, body.version, body.replace, body.activate
            )
            return {
                "status": "ok",
                "lora_name": entry.name,
                "version": entry.version,
                "load_ms": round((time.perf_counter() - started) * 1000, 1),
                "audit": {"version": entry.version},
            }

        fields = {"adapter": body.lora_name, "path": body.lora_path}
        fields["requested_version"] = body.version
        return await audited(key_id, "load_adapter", fields, counted("load", work))

    @router.post("/unload_lora_adapter")
    async def unload_lora_adapter(
        body: UnloadLoraAdapterRequest, key_id: str = Depends(require_admin)
    ) -> dict[str, Any]:
        adapters = registry()

        def work() -> dict[str, Any]:
            versions = adapters.unload(body.lora_name, body.version)
            release_free_memory()
            return {
                "status": "ok",
                "lora_name": body.lora_name,
                "unloaded_versions": versions,
                "audit": {"version": ",".join(versions)},
            }

        fields = {"adapter": body.lora_name, "version": body.version}
        return await audited(key_id, "unload_adapter", fields, counted("unload", work))

    @router.get("/adapters")
    async def list_adapters(_: str = Depends(require_admin)) -> dict[str, Any]:
        return {"object": "list", "data": registry().describe()}

    @router.post("/adapters/{name}/activate")
    async def activate_adapter(
        name: str, body: ActivateAdapterRequest, key_id: str = Depends(require_admin)
    ) -> dict[str, Any]:
        adapters = registry()

        def work() -> dict[str, Any]:
            entry = adapters.activate(name, body.version)
            return {"status": "ok", "lora_name": name, "active_version": entry.version}

        fields = {"adapter": name, "version": body.version}
        return await audited(key_id, "activate_adapter", fields, work)

    @router.post("/adapters/{name}/rollback")
    async def rollback_adapter(name: str, key_id: str = Depends(require_admin)) -> dict[str, Any]:
        adapters = registry()

        def work() -> dict[str, Any]:
            entry = adapters.rollback(name)
            return {
                "status": "ok",
                "lora_name": name,
                "active_version": entry.version,
                "audit": {"version": entry.version},
            }

        return await audited(key_id, "rollback_adapter", {"adapter": name}, work)

    # ----------------------------------------------------------------------------- indexes
    async def write_index(name: str, sources: list[str], key_id: str, replace: bool) -> Any:
        service = retrieval()
        return await audited(
            key_id,
            "build_index" if replace else "add_to_index",
            {"index": name, "sources": sources},
            lambda: service.write_index(name, sources, replace=replace),
        )

    @router.post("/indexes/{name}/build")
    async def build_index(
        name: str, body: IndexSourcesRequest, key_id: str = Depends(require_admin)
    ) -> dict[str, Any]:
        """Create or replace the index with exactly these documents (atomic; unchanged
        documents reuse their embeddings)."""
        return await write_index(name, body.sources, key_id, replace=True)

    @router.post("/indexes/{name}/add")
    async def add_to_index(
        name: str, body: IndexSourcesRequest, key_id: str = Depends(require_admin)
    ) -> dict[str, Any]:
        """Add or refresh documents in an existing index (404 if it does not exist)."""
        return await write_index(name, body.sources, key_id, replace=False)

    @router.delete("/indexes/{name}")
    async def delete_index(name: str, key_id: str = Depends(require_admin)) -> dict[str, Any]:
        service = retrieval()

        def work() -> dict[str, Any]:
            service.delete_index(name)
            return {"status": "ok", "index": name, "deleted": True}

        return await audited(key_id, "delete_index", {"index": name}, work)

    return router
