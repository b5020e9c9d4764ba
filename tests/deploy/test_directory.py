"""The directory's admin lease, without Ray: one holder at a time across replicas; a lease is
free again when its holder releases it, stops reporting, or outlives its ttl. The route
chooser, which keeps the directory, counts a replica ready once its router knows it. And the
Serve application refuses to build without Serve's HAProxy ingress, saying what to set."""

from __future__ import annotations

import asyncio
import time
from collections import namedtuple
from types import SimpleNamespace

import pytest

pytest.importorskip("ray.serve")

from ragtune.config import Settings
from server.deploy import directory as directory_module
from server.deploy.app import build
from server.deploy.route_chooser import RouteChooser

DirectoryClass = directory_module.Directory


async def reported(*replica_ids: str):
    d = DirectoryClass()
    for replica_id in replica_ids:
        await d.report({"id": replica_id, "ready": True})
    return d


@pytest.fixture(autouse=True)
def no_start_grace(monkeypatch) -> None:
    """The grace after a directory starts (LEASE_ADOPT_S) is its own test's subject."""
    monkeypatch.setattr(directory_module, "LEASE_ADOPT_S", 0.0)


def test_one_admin_change_at_a_time() -> None:
    async def scenario() -> None:
        d = await reported("a", "b")
        assert await d.acquire_admin("a", "t1", ttl_s=60, wait_s=1)
        assert not await d.acquire_admin("b", "t2", ttl_s=60, wait_s=0.2)  # a holds it
        waiting = asyncio.create_task(d.acquire_admin("b", "t2", ttl_s=60, wait_s=5))
        await asyncio.sleep(0.1)
        await d.release_admin("t-other")  # only its holder's token frees it
        await asyncio.sleep(0.1)
        assert not waiting.done()
        await d.release_admin("t1")
        assert await waiting

    asyncio.run(scenario())


def test_lease_of_a_dead_or_slow_holder_frees_itself(monkeypatch) -> None:
    async def scenario() -> None:
        d = await reported("a", "b")
        assert await d.acquire_admin("a", "t1", ttl_s=0.2, wait_s=1)
        assert await d.acquire_admin("b", "t2", ttl_s=60, wait_s=2)  # t1 outlived its ttl
        monkeypatch.setattr(directory_module, "STALE_S", 0.1)
        await asyncio.sleep(0.2)
        await d.report({"id": "a", "ready": True})  # b stopped reporting: killed
        assert await d.acquire_admin("a", "t3", ttl_s=60, wait_s=1)

    started = time.monotonic()
    asyncio.run(scenario())
    assert time.monotonic() - started < 5


def test_a_restarted_directory_takes_a_running_changes_lease_back(monkeypatch) -> None:
    """The directory restarts with the route chooser while replica a runs an admin change:
    a's reports carry its lease, and the new directory grants b nothing before a's change
    ends (its release, or a report without the lease where the release went astray)."""
    monkeypatch.setattr(directory_module, "LEASE_ADOPT_S", 0.3)
    lease = {"token": "t1", "expires_in_s": 60.0}

    async def scenario() -> None:
        d = DirectoryClass()  # just restarted: a's report is on its way
        assert not await d.acquire_admin("b", "t2", ttl_s=60, wait_s=0.1)  # the grace
        await d.report({"id": "a", "ready": True, "admin_lease": lease})
        await d.report({"id": "b", "ready": True, "admin_lease": None})
        assert not await d.acquire_admin("b", "t2", ttl_s=60, wait_s=0.4)  # a's, taken back
        assert "admin_lease" not in (await d.replicas())[0]  # reports only, not listings
        await d.release_admin("t1")
        assert await d.acquire_admin("b", "t2", ttl_s=60, wait_s=0.1)
        await d.release_admin("t2")

        d = DirectoryClass()
        await asyncio.sleep(0.3)
        await d.report({"id": "a", "ready": True, "admin_lease": lease})
        assert not await d.acquire_admin("b", "t3", ttl_s=60, wait_s=0.1)
        await d.report({"id": "a", "ready": True, "admin_lease": None})  # a's change ended
        assert await d.acquire_admin("b", "t3", ttl_s=60, wait_s=0.1)
        await d.report({"id": "b", "ready": True, "admin_lease": None})  # in flight meanwhile
        assert not await d.acquire_admin("a", "t4", ttl_s=60, wait_s=0.1)  # b's stays

    asyncio.run(scenario())


def test_a_replica_is_ready_once_the_choosers_router_knows_it() -> None:
    """Serve's router as the chooser's handle holds it (the internals route_chooser.py reads);
    where they are not there, readiness is the replicas' own reports."""
    ReplicaKey = namedtuple("ReplicaKey", "unique_id")  # Serve's ReplicaID: hashable
    chooser = object.__new__(RouteChooser.func_or_class)
    DirectoryClass.__init__(chooser)
    request_router = SimpleNamespace(curr_replicas={})
    router = SimpleNamespace(_asyncio_router=SimpleNamespace(_request_router=None))
    chooser.engines = SimpleNamespace(_router=router)

    def ready() -> list[bool]:
        return [entry["ready"] for entry in asyncio.run(chooser.replicas())]

    for replica_id in ("a", "b"):
        asyncio.run(chooser.report({"id": replica_id, "ready": True}))
    assert ready() == [False, False]  # no word from Serve yet
    router._asyncio_router._request_router = request_router
    request_router.curr_replicas = {ReplicaKey("a"): None}
    assert ready() == [True, False]
    request_router.curr_replicas = {ReplicaKey("a"): None, ReplicaKey("b"): None}
    assert ready() == [True, True]
    asyncio.run(chooser.report({"id": "b", "ready": False}))  # draining: its own word counts
    assert ready() == [True, False]
    chooser.engines = SimpleNamespace(_router=SimpleNamespace())  # internals not as known
    assert ready() == [True, False]


def test_the_application_needs_serves_haproxy_ingress(monkeypatch) -> None:
    monkeypatch.delenv("RAY_SERVE_ENABLE_HA_PROXY", raising=False)
    with pytest.raises(ValueError, match="RAY_SERVE_ENABLE_HA_PROXY=1"):
        build(Settings(), replicas=1)


class _Call:
    def __init__(self, result) -> None:
        self.result = result

    async def remote(self, *args, **kwargs):
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


def test_an_admin_change_without_the_lease_is_a_503_in_openai_shape() -> None:
    import httpx

    from server.auth import KeyStore
    from server.deploy.front import ReplicaFront

    reached = []

    async def app(scope, receive, send) -> None:  # the replica's app: must not run
        reached.append(scope["path"])

    async def post(acquire) -> httpx.Response:
        directory = type("D", (), {})()
        directory.acquire_admin = _Call(acquire)
        directory.release_admin = _Call(None)
        front = ReplicaFront(app, KeyStore([], [], None), directory, "r1", "m", 60)
        transport = httpx.ASGITransport(app=front)
        async with httpx.AsyncClient(transport=transport, base_url="http://r") as http:
            return await http.post("/v1/load_lora_adapter", json={"lora_name": "x"})

    for acquire in (False, RuntimeError("directory restarting")):
        response = asyncio.run(post(acquire))
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "admin_busy"
    assert reached == []
