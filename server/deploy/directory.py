"""Where replicas report themselves each second: id, host, pid, resident adapters, running
and waiting requests, readiness and their metrics page. Every replica reads it to answer
`GET /v1/replicas`, `/ready` and `/metrics` for the whole cluster; a replica that stops
reporting (killed, or being restarted by Ray) drops out after `STALE_S`.

The route chooser's process keeps it (server/deploy/route_chooser.py): a deployment of its
own was one more Ray worker on every cluster, waking ~230 times a second on the engine's
cores (bench/wakeups.py count, docs/deploy.md stop 34).

It also holds the cluster's admin lease: admin changes (adapter loads, activations, index
builds) run one at a time across replicas, since each one rewrites the shared store's
registry document (server/adapters/shared.py) and two at once could lose one of them. A lease
whose holder stopped reporting, or that outlived `ttl_s`, is free again. The holder's reports
carry its lease, so a directory that restarted (with the route chooser) takes a running change's
lease back from them; it grants none until every replica has had time to report.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

STALE_S = 3.0
LEASE_POLL_S = 0.05
# after a start, time for a replica running an admin change to report its lease (replicas
# report every second, server/deploy/replica.py)
LEASE_ADOPT_S = 2.5


class Directory:
    """Every method is a coroutine: Serve runs a deployment's plain methods on a thread pool,
    where a report and a listing at once could change the books while they are read."""

    def __init__(self) -> None:  # no super().__init__(): next in line is Serve's app wrapper
        self._entries: dict[str, tuple[float, dict[str, Any]]] = {}
        self._lease: tuple[str, str, float] | None = None  # (replica id, token, expires at)
        self._adopted = False  # the lease came from a report, not from acquire_admin
        self._started = time.monotonic()

    async def report(self, status: dict[str, Any]) -> None:
        now = time.monotonic()
        self._entries[status["id"]] = (now, status)
        held = status.get("admin_lease") or {}
        lease = self._lease
        if lease is None and held:
            self._lease = (status["id"], held["token"], now + held["expires_in_s"])
            self._adopted = True
        elif self._adopted and lease and lease[0] == status["id"] and held.get("token") != lease[1]:
            self._lease = None  # that change ended (its release went to the old directory)

    async def forget(self, replica_id: str) -> None:
        self._entries.pop(replica_id, None)

    async def replicas(self, with_metrics: bool = False) -> list[dict[str, Any]]:
        self._drop_stale()
        entries = sorted((s for _, s in self._entries.values()), key=lambda s: s["id"])
        # a report's lease is the directory's own business; its metrics page only for /metrics
        hidden = ("admin_lease",) if with_metrics else ("admin_lease", "metrics")
        return [{k: v for k, v in s.items() if k not in hidden} for s in entries]

    async def acquire_admin(self, replica_id: str, token: str, ttl_s: float, wait_s: float) -> bool:
        """Take the admin lease for `token` (held by `replica_id`); False after `wait_s`."""
        deadline = time.monotonic() + wait_s
        while not self._lease_free():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(LEASE_POLL_S)
        self._lease = (replica_id, token, time.monotonic() + ttl_s)
        self._adopted = False
        return True

    async def release_admin(self, token: str) -> None:
        if self._lease is not None and self._lease[1] == token:
            self._lease = None

    def _lease_free(self) -> bool:
        if time.monotonic() - self._started < LEASE_ADOPT_S:
            return False  # a change from before a restart may not have reported yet
        if self._lease is None:
            return True
        holder, _, expires = self._lease
        self._drop_stale()
        if time.monotonic() > expires or holder not in self._entries:
            self._lease = None  # its replica died (or never reported) or it overran
        return self._lease is None

    def _drop_stale(self) -> None:
        now = time.monotonic()
        for key in [k for k, (seen, _) in self._entries.items() if now - seen > STALE_S]:
            del self._entries[key]
