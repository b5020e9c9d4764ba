"""The affinity router's choice on fake replicas: an adapter goes where it is resident
unless that replica is overloaded (absolute cap, or too far above the least loaded); a cold
adapter goes to the least loaded replica with the fewest adapters; base requests to the
least loaded; a routed request counts as resident, and as load, at once (the requests go
out through HAProxy, never through Serve: the router keeps its own books until the next
report)."""

from __future__ import annotations

import asyncio
import time
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
    seq: int = 0  # the replica's report number
    latency_s: float = 1.0  # the mean latency of its recent requests
    replica_id: ReplicaKey = field(init=False)

    def __post_init__(self) -> None:
        self.replica_id = ReplicaKey(self.name)
        self.max_ongoing_requests = 64

    @property
    def routing_stats(self) -> dict:
        return {
            "resident": self.resident,
            "running": self.running,
            "waiting": 0,
            "seq": self.seq,
            "latency_s": self.latency_s,
        }


def router(max_ongoing: int = 16, imbalance: int = 4) -> AffinityRouter:
    r = AffinityRouter.__new__(AffinityRouter)  # no Serve machinery: only the policy
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
    assert choose(router(), [a, b], "x") == [["b"], ["a"]]  # 5 above: b takes it
    a.running, b.running = 16, 14
    assert choose(router(), [a, b], "x") == [["b"], ["a"]]  # at the absolute cap


def test_cold_adapter_goes_to_fewest_resident_and_sticks() -> None:
    a = FakeReplica("a", ["x", "y"])
    b = FakeReplica("b", ["z"])
    r = router()
    assert choose(r, [a, b], "w") == [["b"], ["a"]]
    assert choose(r, [a, b], "w")[0] == ["b"]  # b is loading w now


def test_base_requests_go_to_the_least_loaded() -> None:
    a = FakeReplica("a", [], running=2)
    b = FakeReplica("b", ["x", "y", "z"], running=1)
    assert choose(router(), [a, b], "") == [["b"], ["a"]]


def test_one_replica_per_rank_so_the_routers_order_holds() -> None:
    """Serve picks the shortest queue in its own cache within a rank, and that cache never
    sees the requests HAProxy sends straight to replicas: a rank of two let it send the
    request elsewhere than the router's books said."""
    a, b, c = FakeReplica("a", ["x"], running=1), FakeReplica("b"), FakeReplica("c", ["x"])
    assert choose(router(), [a, b, c], "x") == [["c"], ["a"], ["b"]]  # holders, then the rest
    r = router()
    placed = [choose(r, [b, FakeReplica("d")], name)[0][0] for name in ("p", "q", "s", "t")]
    assert sorted(placed) == ["b", "b", "d", "d"]  # loads one after another split 2 and 2


def test_requests_sent_since_the_last_report_count_as_load() -> None:
    a, b = FakeReplica("a"), FakeReplica("b")
    r = router()
    firsts = [choose(r, [a, b], "")[0][0] for _ in range(4)]
    assert sorted(firsts) == ["a", "a", "b", "b"]  # reports are stale: the books balance
    a.seq, a.running = 1, 0  # a's next report: what it was sent has finished
    assert choose(r, [a, b], "")[0][0] == "a"


def test_requests_sent_longer_ago_than_a_request_takes_count_no_more() -> None:
    a, b = FakeReplica("a", ["x"], latency_s=0.05), FakeReplica("b")
    r = router(imbalance=2)
    for _ in range(3):  # x sticks to a while its requests pile up ...
        assert choose(r, [a, b], "x")[0] == ["a"]
    assert choose(r, [a, b], "x")[0][0] == "b"  # ... up to the imbalance
    time.sleep(0.1)  # a's requests have finished (a fast model, no report yet)
    assert choose(r, [a, b], "x")[0][0] == "a"  # b, loading x, still has its one


def test_a_reports_running_requests_fade_over_their_latency() -> None:
    """A busy holder's report would otherwise count whole until the next one, while the
    requests in it finish and the router sends it new ones: a steady split spilled."""
    a, b = FakeReplica("a", ["x"], running=6, latency_s=0.1), FakeReplica("b")
    r = router(imbalance=4)
    assert choose(r, [a, b], "x")[0][0] == "b"  # 6 running: more than 4 above b
    time.sleep(0.1)  # a latency later, with no new report, those six have finished
    assert choose(r, [a, b], "x")[0][0] == "a"


def test_before_any_request_finished_only_the_report_counts() -> None:
    """How long a request takes is unknown until one finishes: a burst then sticks to the
    holders (counting sends for a guessed latency spilled them at c=8)."""
    a, b = FakeReplica("a", ["x"], latency_s=0.0), FakeReplica("b", latency_s=0.0)
    r = router(imbalance=2)
    assert {choose(r, [a, b], "x")[0][0] for _ in range(8)} == {"a"}
    a.seq, a.running = 1, 8  # the first report of the burst: now it counts
    assert choose(r, [a, b], "x")[0][0] == "b"
