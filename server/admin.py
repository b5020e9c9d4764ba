"""Admin routes: adapter and index changes. Admin scope only; every action is audited
(success or failure) without the key, by the key's id."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, Request

from server.adapters.errors import AdapterError, AdapterNotFoundError
from server.adapters.registry import AdapterRegistry
from server.admin_protocol import (
    ActivateAdapterRequest,
    CanaryRequest,
    IndexSourcesRequest,
    LoadLoraAdapterRequest,
    PromoteAdapterRequest,
    UnloadLoraAdapterRequest,
)
from server.canary import CanaryRouter
from server.memory import release_free_memory
from server.protocol import ErrorResponse
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
            promoted = canaries().promoted(name, entry.version)  # a canary's version: it ends
            result = {"status": "ok", "lora_name": name, "active_version": entry.version}
            if promoted is not None:
                result["canary"] = promoted.describe()
                result["audit"] = {"canary": "promoted"}
            return result

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

    # ---------------------------------------------------------------------- canary and gate
    def canaries() -> CanaryRouter:
        assert state.canary is not None  # made with the app
        return state.canary

    @router.post("/adapters/{name}/canary")
    async def start_canary(
        name: str, body: CanaryRequest, key_id: str = Depends(require_admin)
    ) -> dict[str, Any]:
        """Send `fraction` of `model=name` requests to `version` until stopped, promoted
        (activated) or rolled back by itself (config section `canary`)."""
        adapters = registry()

        def work() -> dict[str, Any]:
            found = next((a for a in adapters.describe() if a["name"] == name), None)
            if found is None:
                raise AdapterNotFoundError(f"adapter {name} is not loaded")
            if body.version not in {v["version"] for v in found["versions"]}:
                raise AdapterNotFoundError(f"adapter {name}@{body.version} is not loaded")
            if body.version == found["active_version"]:
                raise AdapterError(
                    f"{name}@{body.version} is already the active version; a canary needs "
                    "another loaded version",
                    param="version",
                )
            canary = canaries().start(name, body.version, body.fraction, key_id)
            result = {"status": "ok", "canary": canary.describe()}
            result["audit"] = {"active_version": found["active_version"]}
            return result

        fields = {"adapter": name, "version": body.version, "fraction": body.fraction}
        return await audited(key_id, "start_canary", fields, work)

    @router.get("/adapters/{name}/canary")
    async def get_canary(name: str, _: str = Depends(require_admin)) -> dict[str, Any]:
        """The adapter's latest canary (running or ended) with its per-version counts."""
        found = canaries().describe(name)
        if found is None:
            raise AdapterNotFoundError(f"adapter {name} has had no canary")
        return {"canary": found}

    @router.delete("/adapters/{name}/canary")
    async def stop_canary(name: str, key_id: str = Depends(require_admin)) -> dict[str, Any]:
        """End the running canary; traffic goes back to the active version."""

        def work() -> dict[str, Any]:
            canary = canaries().stop(name, "stopped", "stopped by an admin")
            audit = {"version": canary.version}
            return {"status": "ok", "canary": canary.describe(), "audit": audit}

        return await audited(key_id, "stop_canary", {"adapter": name}, work)

    @router.post("/adapters/{name}/promote")
    async def promote_adapter(
        name: str, body: PromoteAdapterRequest, key_id: str = Depends(require_admin)
    ) -> dict[str, Any]:
        """Record a promotion gate's decision (`ragtune adapters promote`) in the audit log
        and the version's manifest; an accepted one activates the version (and promotes a
        canary of it), a refused one changes nothing else."""
        adapters = registry()
        decision = "accepted" if body.accepted else "refused"

        def work() -> dict[str, Any]:
            record = {
                **body.gate,  # the numbers; never overriding who decided what, and when
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "decision": decision,
                "key_id": key_id,
                "requested_by": body.requested_by,
            }
            if body.accepted:
                entry = adapters.activate(name, body.version)
                promoted = canaries().promoted(name, entry.version)
            else:
                promoted = None
            written = adapters.note_promotion(
                name, body.version, record, write=state.settings.store.url is None
            )
            active = next(a for a in adapters.describe() if a["name"] == name)
            result: dict[str, Any] = {
                "status": "ok",
                "lora_name": name,
                "version": body.version,
                "decision": decision,
                "active_version": active["active_version"],
                "manifest_written": written,
            }
            if promoted is not None:
                result["canary"] = promoted.describe()
            result["audit"] = {"canary": "promoted" if promoted else None}
            return result

        fields = {
            "adapter": name,
            "version": body.version,
            "decision": decision,
            "requested_by": body.requested_by,
            "gate": body.gate,
        }
        return await audited(key_id, "promote_adapter", fields, work)

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
