"""A replica's HTTP front on Ray Serve: HAProxy sends clients straight to each replica's own
HTTP server, so every replica answers for the whole cluster what one process answers for
itself: `/ready` (ready once some replica is, with their count), `/metrics` (every replica's
families, labelled `replica`) and `GET /v1/replicas` (admin scope), from the directory. Admin
changes run under the directory's cluster-wide lease, one at a time. Everything else goes to
the replica's ragtune app unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

from prometheus_client import Metric, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from server.auth import KeyStore
from server.errors import APIError, ServiceUnavailableError, error_response

logger = logging.getLogger("ragtune.front")

DIRECTORY_TIMEOUT_S = 10.0


def is_admin_change(method: str, path: str) -> bool:
    if method == "POST" and path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        return True
    if method == "POST" and path.startswith("/v1/adapters/"):
        return True
    return method in ("POST", "DELETE") and path.startswith("/v1/indexes/")


class ReplicaFront:
    def __init__(
        self,
        app: ASGIApp,
        keys: KeyStore,
        directory: Any,
        replica_id: str,
        model_name: str,
        admin_ttl_s: float,
    ) -> None:
        self.app = app
        self.keys = keys
        self.directory = directory
        self.replica_id = replica_id
        self.model_name = model_name
        self.admin_ttl_s = admin_ttl_s
        self._lease: tuple[str, float] | None = None  # (token, expires at) while a change runs

    def held_lease(self) -> dict[str, Any] | None:
        """The admin lease this replica holds, for its reports: a directory that restarted
        meanwhile takes it back from them instead of granting another change at once."""
        if self._lease is None:
            return None
        token, expires = self._lease
        return {"token": token, "expires_in_s": max(0.0, expires - time.monotonic())}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":  # the replica runs its app's lifespan itself
            await _lifespan_done(receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        try:
            if path in ("/ready", "/metrics") or (path == "/v1/replicas" and method == "GET"):
                response = await self.cluster_route(Request(scope), path)
                await response(scope, receive, send)
            elif is_admin_change(method, path):
                await self.one_admin_change(scope, receive, send)
            else:
                await self.app(scope, receive, send)
        except APIError as exc:
            await error_response(exc)(scope, receive, send)

    async def cluster_route(self, request: Request, path: str) -> Response:
        if path == "/ready":
            ready = [r for r in await self._entries() if r["ready"]]
            if not ready:
                raise ServiceUnavailableError("no replica is ready yet")
            body = {"status": "ready", "model": self.model_name, "replicas": len(ready)}
            return JSONResponse(body)
        if path == "/metrics":
            self.keys.check_client(request)
            pages = [r["metrics"] for r in await self._entries(with_metrics=True)]
            return Response(generate_latest(_Merged(pages)), media_type="text/plain; version=0.0.4")
        self.keys.check_admin(request)
        return JSONResponse({"object": "list", "data": await self._entries()})

    async def one_admin_change(self, scope: Scope, receive: Receive, send: Send) -> None:
        token = uuid.uuid4().hex
        try:
            acquired = await self.directory.acquire_admin.remote(
                self.replica_id, token, self.admin_ttl_s, self.admin_ttl_s
            )
        except Exception as exc:  # the directory restarting: nothing was changed
            raise ServiceUnavailableError(
                f"the replica directory is unavailable: {exc}", code="admin_busy"
            ) from exc
        if not acquired:
            raise ServiceUnavailableError(
                "another admin change is still running; retry", code="admin_busy"
            )
        self._lease = (token, time.monotonic() + self.admin_ttl_s)
        try:
            await self.app(scope, receive, send)
        finally:
            self._lease = None
            try:
                await self.directory.release_admin.remote(token)
            except Exception as exc:  # the lease expires with its ttl or holder
                logger.warning("cannot release the admin lease: %s", exc)

    async def _entries(self, with_metrics: bool = False) -> list[dict[str, Any]]:
        try:
            return await asyncio.wait_for(
                self.directory.replicas.remote(with_metrics=with_metrics), DIRECTORY_TIMEOUT_S
            )
        except Exception as exc:  # the directory restarting
            raise ServiceUnavailableError(f"the replica directory is unavailable: {exc}") from exc


class _Merged:
    """Every replica's metrics families (already labelled `replica`) merged by name."""

    def __init__(self, pages: list[str]) -> None:
        self.pages = pages

    def collect(self):
        families: dict[str, Metric] = {}
        for page in self.pages:
            for family in text_string_to_metric_families(page):
                merged = families.setdefault(
                    family.name,
                    Metric(family.name, family.documentation, family.type, family.unit),
                )
                merged.samples.extend(family.samples)
        yield from families.values()


async def _lifespan_done(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
