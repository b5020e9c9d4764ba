"""Adapter-affinity routing: a request for adapter X goes to a replica that has X's weights
in memory, unless that replica is overloaded; otherwise to the least loaded replica (fewest
resident adapters on a tie), which then loads X. Base-model and RAG requests go to the least
loaded replica. Overloaded: `affinity_max_ongoing` requests in flight, or more than
`affinity_imbalance` above the least loaded replica (else a replica that holds every adapter
would keep all traffic while a new or restarted one stays idle).

The route chooser (server/deploy/route_chooser.py) asks this router for one replica per
request and HAProxy sends the request there directly, so Serve never sees the request itself:
the router keeps its own books. Each replica reports its engine's running and waiting
requests and its resident adapters in `record_routing_stats` (every `STATS_PERIOD_S`, with a
sequence number and the mean latency of its recent requests); a replica's load is its last
report, whose running requests are counted as finishing evenly over that latency (a report
one latency old counts none of them still running), plus the requests this router sent it
since that report and less than that latency ago (the others have finished: a fast model
takes many requests between two reports). Counting the report whole until the next one
overestimated a busy holder by every request it started since, so a steady 3-to-1 split of
adapters spilled onto the other replica (and missed). An
adapter just sent to a replica counts as resident there at once
(the replica is loading it), so a burst for a cold adapter does not load it everywhere before
the next report.

Why not Serve's own multiplexing (`@serve.multiplexed`): its list of a replica's models is
its own LRU of loader calls, which knows nothing of adapters unloaded through the admin API
or evicted by the registry.
"""

from __future__ import annotations

import random
import time
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

STATS_PERIOD_S = 1.0
ASSUMED_S = 10.0  # how long a routed request counts as residency without a report


class AffinityRouter(RequestRouter):
    def initialize_state(
        self, affinity_max_ongoing: int = 16, affinity_imbalance: int = 4, **_: Any
    ) -> None:
        self.affinity_max_ongoing = affinity_max_ongoing
        self.affinity_imbalance = affinity_imbalance
        self._assumed: dict[ReplicaID, dict[str, float]] = {}
        # per replica: the report's seq, when this router first saw it, send times since
        self._sent: dict[ReplicaID, tuple[Any, float, list[float]]] = {}

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        model = pending_request.metadata.multiplexed_model_id if pending_request else ""
        if not model:  # ties at random: idle replicas share the work
            ranked = sorted(candidate_replicas, key=lambda r: (self.load(r), random.random()))
            return self._picked(ranked)
        # a cold adapter goes where the fewest adapters are resident (ties at random)
        by_load = sorted(
            candidate_replicas,
            key=lambda r: (self.load(r), len(self.resident(r)), random.random()),
        )
        limit = min(self.affinity_max_ongoing, self.load(by_load[0]) + self.affinity_imbalance + 1)
        holders = [r for r in by_load if model in self.resident(r) and self.load(r) < limit]
        picked = self._picked(holders + [r for r in by_load if r not in holders])
        self._assumed.setdefault(picked[0][0].replica_id, {})[model] = time.monotonic()
        return picked

    # ------------------------------------------------------------------------- helpers
    def _picked(self, order: list[RunningReplica]) -> list[list[RunningReplica]]:
        """One replica per rank, best first, and the first counted as sent. Serve takes a
        rank's replica with the shortest queue in its own cache, which never sees requests
        HAProxy sends straight to a replica: with two in one rank it overrode this order and
        left the books here on a replica the request never reached. Serve moves to the next
        rank only when a replica is full."""
        self.load(order[0])  # starts the books on this replica's current report
        self._sent[order[0].replica_id][2].append(time.monotonic())
        return [[replica] for replica in order]

    def load(self, replica: RunningReplica) -> int:
        """Requests at the replica: its engine's last report (waiting, plus the running
        ones not yet likely finished) plus the requests sent to it since that report that
        are likely still running."""
        stats = replica.routing_stats or {}
        now = time.monotonic()
        seq, seen, sent = self._sent.get(replica.replica_id, (None, now, []))
        if stats.get("seq") != seq or replica.replica_id not in self._sent:
            seq, seen, sent = stats.get("seq"), now, []  # a new report counts what came before
            self._sent[replica.replica_id] = (seq, seen, sent)
        running, waiting = int(stats.get("running", 0)), int(stats.get("waiting", 0))
        latency = float(stats.get("latency_s", STATS_PERIOD_S))
        if latency <= 0:  # no request finished there yet: how long one takes is unknown
            sent.clear()
            return running + waiting
        sent[:] = [t for t in sent if t > now - latency]
        still_running = max(0.0, 1.0 - (now - seen) / latency)
        return round(running * still_running) + waiting + len(sent)

    def resident(self, replica: RunningReplica) -> set[str]:
        reported = set((replica.routing_stats or {}).get("resident", ()))
        assumed = self._assumed.get(replica.replica_id)
        if assumed:
            now = time.monotonic()
            for model, since in list(assumed.items()):
                if now - since > ASSUMED_S:
                    del assumed[model]
            reported |= assumed.keys()
        return reported
