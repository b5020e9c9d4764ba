"""The HTTP ingress of `ragtune serve --replicas`: the same OpenAI API as one process.

It reads only what routing needs (the body's `model` and `stream`), sends the request to an
engine replica through the affinity router and relays the replica's response unchanged
(including `X-Ragtune-Replica`). A replica that dies before its response is complete costs
a non-streamed request nothing: it is sent once more, to another replica; a stream already
under way ends with an error event. Admin changes go through one at a time (each replica
publishes them to the shared store, the others follow within `store.poll_s`). It answers
itself `/health`, `/ready` (some replica ready), `/metrics` (every replica's, labelled
`replica`) and `GET /v1/replicas` (admin scope).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Metric, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ragtune.config import Settings
from server.auth import KeyStore
from server.deploy.bridge import ProxiedRequest
from server.errors import APIError, ServiceUnavailableError, error_response

logger = logging.getLogger("ragtune.gateway")

GENERATION_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
REPLICA_LOST = (RayActorError, ActorUnavailableError)
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "upgrade", "host"}


class PayloadTooLargeError(APIError):
    status_code = 413
    error_type = "invalid_request_error"
    code = "payload_too_large"


def is_admin_change(method: str, path: str) -> bool:
    if method == "POST" and path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        return True
    if method == "POST" and path.startswith("/v1/adapters/"):
        return True
    return method in ("POST", "DELETE") and path.startswith("/v1/indexes/")


def routing_facts(method: str, path: str, body: bytes, base_ids: set[str]) -> tuple[str, bool]:
    """(adapter id for the router, '' for none; whether the response streams)."""
    if method != "POST" or path not in GENERATION_ROUTES:
        return "", False
    try:
        parsed = json.loads(body)
    except ValueError:
        return "", False  # the replica answers 400
    if not isinstance(parsed, dict):
        return "", False
    model = parsed.get("model")
    adapter = model if isinstance(model, str) and model not in base_ids else ""
    return adapter[:200], parsed.get("stream") is True


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress()
class Gateway:
    def __init__(self, settings: dict[str, Any], keys: KeyStore, replicas: Any, directory: Any):
        self.settings = Settings.model_validate(settings)
        self.keys = keys
        self.replicas = replicas
        self.directory = directory
        self.base_ids = {
            self.settings.model.served_model_name,
            self.settings.retrieval.embedder_name,
        }
        self._admin_lock = asyncio.Lock()
        self.metrics = CollectorRegistry()
        self.retries = Counter(
            "ragtune_gateway_retries",
            "Non-streamed requests sent again after their replica was lost",
            registry=self.metrics,
        )
        self.lost = Counter(
            "ragtune_gateway_replica_lost",
            "Requests whose replica was lost, by whether a response had started",
            ["started"],
            registry=self.metrics,
        )

    def __serve_build_asgi_app__(self) -> Starlette:
        methods = ["GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS"]
        return Starlette(routes=[Route("/{path:path}", self.dispatch, methods=methods)])

    async def dispatch(self, request: Request) -> Response:
        try:
            path, method = request.url.path, request.method
            if path == "/health":
                return JSONResponse({"status": "ok"})
            if path == "/ready":
                return await self.ready()
            if path == "/metrics":
                self.keys.check_client(request)
                return await self.render_metrics()
            if path == "/v1/replicas" and method == "GET":
                self.keys.check_admin(request)
                entries = await self.directory.replicas.remote()
                return JSONResponse({"object": "list", "data": entries})
            return await self.forward(request)
        except APIError as exc:
            return error_response(exc)

    async def ready(self) -> Response:
        ready = [r for r in await self.directory.replicas.remote() if r["ready"]]
        if not ready:
            return error_response(ServiceUnavailableError("no replica is ready yet"))
        model = self.settings.model.served_model_name
        return JSONResponse({"status": "ready", "model": model, "replicas": len(ready)})

    async def forward(self, request: Request) -> Response:
        limit = self.settings.limits.max_body_bytes
        if int(request.headers.get("content-length") or 0) > limit:
            raise PayloadTooLargeError(f"request body is larger than {limit} bytes")
        body = await request.body()
        if len(body) > limit:
            raise PayloadTooLargeError(f"request body is larger than {limit} bytes")
        method, path = request.method, request.url.path
        adapter, streamed = routing_facts(method, path, body, self.base_ids)
        proxied = ProxiedRequest(
            method=method,
            path=path,
            query=request.url.query,
            headers=[(k, v) for k, v in request.headers.items() if k not in HOP_BY_HOP],
            body=body,
            client=request.client.host if request.client else "",
        )
        if is_admin_change(method, path):
            async with self._admin_lock:
                return await self.send(proxied, "", streamed=False)
        return await self.send(proxied, adapter, streamed)

    async def send(self, proxied: ProxiedRequest, adapter: str, streamed: bool) -> Response:
        handle = self.replicas.options(stream=True, multiplexed_model_id=adapter)
        for attempt in (1, 2):
            responses = handle.handle.remote(proxied)
            try:
                head = await responses.__anext__()
                if streamed:
                    return _streaming(head, self._relay(responses))
                chunks = [chunk async for chunk in responses]
                return _response(head, b"".join(chunks))
            except REPLICA_LOST as exc:
                self.lost.labels("no").inc()
                logger.warning("replica lost before its response (try %d): %s", attempt, exc)
                if attempt == 1 and not streamed:
                    self.retries.inc()
                    continue
                if attempt == 1 and streamed:  # nothing was sent yet: as good as new
                    continue
        return error_response(
            ServiceUnavailableError(
                "the replica serving this request stopped; retry", code="replica_unavailable"
            )
        )

    async def _relay(self, responses: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        try:
            async for chunk in responses:
                yield chunk
        except REPLICA_LOST as exc:
            self.lost.labels("yes").inc()
            logger.warning("replica lost in the middle of a stream: %s", exc)
            error = {
                "error": {
                    "message": "the replica serving this stream stopped; retry the request",
                    "type": "service_unavailable",
                    "param": None,
                    "code": "replica_unavailable",
                }
            }
            yield f"data: {json.dumps(error)}\n\n".encode()

    async def render_metrics(self) -> Response:
        pages = [r["metrics"] for r in await self.directory.replicas.remote(with_metrics=True)]
        merged = _Merged(pages, self.metrics)
        return Response(generate_latest(merged), media_type="text/plain; version=0.0.4")


class _Merged:
    """Every replica's metrics families (already labelled `replica`) merged by name, plus
    the gateway's own."""

    def __init__(self, pages: list[str], own: CollectorRegistry) -> None:
        self.pages = pages
        self.own = own

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
        yield from self.own.collect()


def _headers(head: dict[str, Any], streamed: bool) -> list[tuple[bytes, bytes]]:
    # Serve's proxy sets X-Request-ID itself (the same id: the replica kept the one the
    # proxy forwarded), so the replica's copy would repeat it
    drop = {"transfer-encoding", "x-request-id"} | ({"content-length"} if streamed else set())
    return [
        (k.encode("latin-1"), v.encode("latin-1"))
        for k, v in head["headers"]
        if k.lower() not in drop
    ]


def _response(head: dict[str, Any], body: bytes) -> Response:
    response = Response(content=body, status_code=head["status"])
    response.raw_headers = _headers(head, streamed=False)
    return response


def _streaming(head: dict[str, Any], body: AsyncIterator[bytes]) -> StreamingResponse:
    response = StreamingResponse(body, status_code=head["status"])
    response.raw_headers = _headers(head, streamed=True)
    return response
