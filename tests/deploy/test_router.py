"""The affinity router's choice on fake replicas: an adapter goes where it is resident
unless that replica is overloaded (absolute cap, or too far above the least loaded); a cold
adapter goes to the least loaded replica with the fewest adapters; base requests to the
least loaded; a routed request counts as resident at once."""

from __future__ import annotations

import asyncio
from collections import namedtuple
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

pytest.importorskip("ray.serve")

from server.deploy.router import AffinityRouter

ReplicaKey = namedtuple("ReplicaKey", "unique_id")  # hashable, like Serve's ReplicaID


@dataclass
class FakeReplica:
    name: str
    resident: list[str] = field(default_factory=list)
    running: int = 0
    replica_id: ReplicaKey = field(init=False)

    def __post_init__(self) -> None:
        self.replica_id = ReplicaKey(self.name)
        self.max_ongoing_requests = 64

    @property
    def routing_stats(self) -> dict:
        return {"resident": self.resident, "running": self.running, "waiting": 0}


def router(max_ongoing: int = 16, imbalance: int = 4) -> AffinityRouter:
    r = AffinityRouter.__new__(AffinityRouter)  # no Serve machinery: only the policy
    r._replica_queue_len_cache = SimpleNamespace(get=lambda replica_id: None)
    r.initialize_state(affinity_max_ongoing=max_ongoing, affinity_imbalance=imbalance)
    return r


def request(model: str) -> SimpleNamespace:
    return SimpleNamespace(metadata=SimpleNamespace(multiplexed_model_id=model))


def choose(r: AffinityRouter, replicas: list[FakeReplica], model: str) -> list[list[str]]:
    ranks = asyncio.run(r.choose_replicas(replicas, request(model)))
    return [[x.name for x in rank] for rank in ranks]


def test_resident_adapter_wins_until_overloaded() -> None:
    a = FakeReplica("a", ["x"], running=3)
    b = FakeReplica("b", [], running=0)
    assert choose(router(), [a, b], "x")[0] == ["a"]  # 3 above the least loaded: fine
    a.running = 5
    assert choose(router(), [a, b], "x") == [["b", "a"]]  # 5 above: b takes it
    a.running, b.running = 16, 14
    assert choose(router(), [a, b], "x") == [["b", "a"]]  # at the absolute cap


def test_cold_adapter_goes_to_fewest_resident_and_sticks() -> None:
    a = FakeReplica("a", ["x", "y"])
    b = FakeReplica("b", ["z"])
    r = router()
    assert choose(r, [a, b], "w") == [["b", "a"]]
    r.on_request_routed(request("w"), b.replica_id, None)  # b is loading w now
    assert choose(r, [a, b], "w")[0] == ["b"]


def test_base_requests_go_to_the_least_loaded() -> None:
    a = FakeReplica("a", [], running=2)
    b = FakeReplica("b", ["x", "y", "z"], running=1)
    assert choose(router(), [a, b], "") == [["b", "a"]]
