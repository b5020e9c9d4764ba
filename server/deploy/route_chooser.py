"""Which replica serves a request: HAProxy (Serve's ingress with `RAY_SERVE_ENABLE_HA_PROXY`)
posts each POST's body to `/internal/route` here, this deployment asks the affinity router
(server/deploy/router.py) for a replica and answers its host and port; HAProxy then sends the
request, and streams the response back, straight between the client and that replica's own
HTTP server. No Python process relays a byte of a response (the Ray Serve LLM "direct
streaming" layout). GET requests need no choice: HAProxy sends them to the least busy replica.

The chooser also keeps the replicas' directory (server/deploy/directory.py): replicas reach
it by name (`directory_handle`), since the chooser is bound to their handle already.

Only the body's `model` matters here: the replica itself validates everything else and
answers errors in OpenAI's format.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from ray import serve
from ray.serve.exceptions import DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ragtune.config import Settings
from server.deploy.directory import Directory

logger = logging.getLogger("ragtune.route_chooser")


def adapter_of(body: bytes, base_ids: set[str]) -> str:
    """The adapter a request body names ('' for the base model, an embedder, or a body that
    is not a JSON object: the replica answers that one 400). An admin body's `lora_name`
    (`/v1/load_lora_adapter`) counts as its model: the replica that loads an adapter is where
    the router then sends its requests, so loads spread over the replicas as cold adapters do
    (HAProxy forwards the body, not the path)."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return ""
    if not isinstance(parsed, dict):
        return ""
    model = parsed.get("model", parsed.get("lora_name"))
    return model[:200] if isinstance(model, str) and model not in base_ids else ""


CHOOSER_DEPLOYMENT = "RouteChooser"


def directory_handle() -> DeploymentHandle:
    """The directory's handle, from inside one of the application's replicas."""
    return serve.get_deployment_handle(CHOOSER_DEPLOYMENT, _check_exists=False)


@serve.deployment(
    name=CHOOSER_DEPLOYMENT,
    num_replicas=1,
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=1000,
)
@serve.ingress()
class RouteChooser(Directory):
    async def __init__(self, settings: dict[str, Any], engines: DeploymentHandle) -> None:
        super().__init__()
        parsed = Settings.model_validate(settings)
        self.base_ids = {parsed.model.served_model_name, parsed.retrieval.embedder_name}
        self.engines = engines  # not `replicas`: the directory's method of that name
        # Serve makes a handle's router at its first use: make it now, so that it follows the
        # replicas from the start and `/ready` can count only those it routes to
        engines.options()
        if self.routable_ids() is None:
            logger.warning(
                "cannot read which replicas Serve's router knows (Serve's internals changed): "
                "/ready counts replicas from their own reports"
            )

    def routable_ids(self) -> set[str] | None:
        """The replicas the router may send requests to (Serve's controller tells it of each
        one once it serves); None where Serve's internals are not as this code knows them."""
        # `_request_router`, not the `request_router` property: that one makes the router,
        # and Serve's router thread must be the one to make it
        asyncio_router = getattr(getattr(self.engines, "_router", None), "_asyncio_router", None)
        if asyncio_router is None or not hasattr(asyncio_router, "_request_router"):
            return None
        request_router = asyncio_router._request_router
        if request_router is None:  # made at the controller's first word on the replicas
            return set()
        return {replica_id.unique_id for replica_id in list(request_router.curr_replicas)}

    async def replicas(self, with_metrics: bool = False) -> list[dict[str, Any]]:
        """The directory's entries, each replica ready only once the router can send it
        requests. A replica reports itself as soon as its model is loaded, a moment before
        Serve's controller tells routers of it: adapters loaded in that moment all went to
        the one replica the router knew (4 and 0, docs/deploy.md stop 32)."""
        entries = await super().replicas(with_metrics)
        routable = self.routable_ids()
        if routable is None:
            return entries
        return [{**entry, "ready": entry["ready"] and entry["id"] in routable} for entry in entries]

    def __serve_build_asgi_app__(self) -> Starlette:
        return Starlette(routes=[Route("/internal/route", self.route, methods=["POST"])])

    async def route(self, request: Request) -> JSONResponse:
        adapter = adapter_of(await request.body(), self.base_ids)
        handle = self.engines.options(multiplexed_model_id=adapter) if adapter else self.engines
        try:
            async with handle.choose_replica(_reserve=False) as selection:
                replica = selection._replica  # Serve's own ingress router reads it the same way
                endpoint = replica.backend_http_endpoint
                replica_id = replica.replica_id.to_full_id_str()
        except (DeploymentUnavailableError, RuntimeError) as exc:  # HAProxy answers 503
            logger.warning("no replica to route to: %s", exc)
            return JSONResponse({"detail": str(exc)}, status_code=503)
        if endpoint is None:
            return JSONResponse({"detail": f"{replica_id} has no HTTP port"}, status_code=503)
        host, port = endpoint
        return JSONResponse({"host": host, "port": port, "replica_id": replica_id})
