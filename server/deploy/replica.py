"""One engine replica on Ray Serve: the whole single-process server (server/app.py) behind
the replica's own HTTP server (Serve's direct ingress), which HAProxy sends clients to; the
front (server/deploy/front.py) adds the cluster-wide routes and the admin lease.

The constructor returns only once the model is loaded, so Serve sends a replica no traffic
before it can serve; a model that cannot load fails the constructor with the reason, which
`serve status` and the driver's log show (Serve retries, then marks the deployment failed).
Torch threads follow the CPUs Ray gave the replica (`model.threads: auto`). Each second the
replica reports itself to the directory (kept by the route chooser); the router reads
`record_routing_stats`.
(`self.app` is Serve's name for the ingress app, so the ragtune app is `self.ragtune`.)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
from typing import Any

from ray import serve

from ragtune.config import Settings
from server.auth import KeyStore
from server.deploy.front import ReplicaFront
from server.deploy.route_chooser import directory_handle

logger = logging.getLogger("ragtune.replica")

REPORT_EVERY_S = 1.0


@serve.deployment(health_check_period_s=2, health_check_timeout_s=30)
@serve.ingress()
class EngineReplica:
    async def __init__(self, settings: dict[str, Any], keys: KeyStore) -> None:
        from server.app import create_app
        from server.logs import configure_logging
        from server.memory import limit_arenas

        parsed = Settings.model_validate(settings)
        configure_logging(parsed.server.log_level, parsed.server.log_format)
        limit_arenas()
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.ragtune = create_app(parsed, replica_id=self.replica_id)
        self.state = self.ragtune.state.ragtune
        self.state.keys = keys  # digests only: plaintext keys never travel through Ray
        self.directory = directory_handle()
        self.host = _host()
        self._reports = itertools.count()  # numbers routing stats: the router's books
        # 0 until a request finishes: a guess would count a burst's requests as running
        # for that long (a guess of 1 s counted 2.5x the load of the first second at c=8,
        # and the router spilled resident adapters onto the other replica)
        self._latency_seen, self._latency_s = (0.0, 0.0), 0.0
        self.front = ReplicaFront(
            self.ragtune,
            keys,
            self.directory,
            self.replica_id,
            parsed.model.served_model_name,
            admin_ttl_s=parsed.limits.request_timeout_s,
        )
        self._lifespan = self.ragtune.router.lifespan_context(self.ragtune)
        await self._lifespan.__aenter__()  # starts the model load on its own thread
        await asyncio.to_thread(self.state.loaded.wait)
        if self.state.serving is None:
            raise RuntimeError(self.state.load_error or "the model did not load")
        self._reporter = asyncio.create_task(self._report_forever())
        logger.info("replica %s ready on %s (pid %d)", self.replica_id, self.host, os.getpid())

    def __serve_build_asgi_app__(self) -> ReplicaFront:
        return self.front

    def record_routing_stats(self) -> dict[str, Any]:
        """What the affinity router needs (server/deploy/router.py)."""
        serving = self.state.serving
        return {
            "resident": serving.registry.resident_ids(),
            "running": serving.engine.num_running,
            "waiting": serving.engine.num_waiting,
            "seq": next(self._reports),
            "latency_s": self._recent_latency(),
        }

    def _recent_latency(self) -> float:
        """Mean latency of the generations finished since the last call (the last such mean
        when none finished): how long the router counts a request it sent as running."""
        total = count = 0.0
        for family in self.state.metrics.latency.collect():
            for sample in family.samples:
                if sample.name.endswith("_sum"):
                    total += sample.value
                elif sample.name.endswith("_count"):
                    count += sample.value
        seen_total, seen_count = self._latency_seen
        if count > seen_count:
            self._latency_s = (total - seen_total) / (count - seen_count)
        self._latency_seen = (total, count)
        return self._latency_s

    def check_health(self) -> None:
        if self.state.serving is None:
            raise RuntimeError(self.state.load_error or "the model is not loaded")

    def status(self, with_metrics: bool = True) -> dict[str, Any]:
        serving = self.state.serving
        status = {
            "id": self.replica_id,
            "host": self.host,
            "pid": os.getpid(),
            "ready": serving is not None and not self.state.draining,
            "adapters": serving.registry.model_ids() if serving else [],
            "resident_adapters": serving.registry.resident_ids() if serving else [],
            "running": serving.engine.num_running if serving else 0,
            "waiting": serving.engine.num_waiting if serving else 0,
            "threads": serving.engine.team.threads if serving else 0,
            "admin_lease": self.front.held_lease(),
        }
        if with_metrics:
            status["metrics"] = self.state.metrics.render().decode()
        return status

    async def _report_forever(self) -> None:
        while True:
            try:  # bounded: a handle waits for the directory while Serve restarts it
                await asyncio.wait_for(self.directory.report.remote(self.status()), 5)
            except Exception as exc:  # the directory restarting: try again next time
                logger.debug("cannot report to the directory: %s", exc)
            await asyncio.sleep(REPORT_EVERY_S)

    async def __del__(self) -> None:
        """Serve's graceful stop: refuse new work, finish what is running, stop the engine."""
        self.state.draining = True
        self._reporter.cancel()
        with contextlib.suppress(Exception):  # the directory may be stopping too
            await asyncio.wait_for(self.directory.forget.remote(self.replica_id), 1)
        await self._lifespan.__aexit__(None, None, None)


def _host() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:
        return socket.gethostname()
