"""Where replicas report themselves each second: id, host, pid, resident adapters, running
and waiting requests, readiness and their metrics page. The gateway reads it for
`GET /v1/replicas`, `/ready` and `/metrics`; a replica that stops reporting (killed, or
being restarted by Ray) drops out after `STALE_S`."""

from __future__ import annotations

import time
from typing import Any

from ray import serve

STALE_S = 3.0


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
class Directory:
    def __init__(self) -> None:
        self._entries: dict[str, tuple[float, dict[str, Any]]] = {}

    def report(self, status: dict[str, Any]) -> None:
        self._entries[status["id"]] = (time.monotonic(), status)

    def forget(self, replica_id: str) -> None:
        self._entries.pop(replica_id, None)

    def replicas(self, with_metrics: bool = False) -> list[dict[str, Any]]:
        now = time.monotonic()
        for key in [k for k, (seen, _) in self._entries.items() if now - seen > STALE_S]:
            del self._entries[key]
        entries = sorted((s for _, s in self._entries.values()), key=lambda s: s["id"])
        if with_metrics:
            return entries
        return [{k: v for k, v in s.items() if k != "metrics"} for s in entries]
