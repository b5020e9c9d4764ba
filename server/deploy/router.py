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
report plus the requests this router sent it since that report and less than that latency
ago (the others have finished: a fast model takes many requests between two reports), and an
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
        self._sent: dict[ReplicaID, tuple[Any, list[float]]] = {}  # report seq, send times

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
            return self._picked([ranked])
        # a cold adapter goes where the fewest adapters are resident (ties at random)
        by_load = sorted(
            candidate_replicas,
            key=lambda r: (self.load(r), len(self.resident(r)), random.random()),
        )
        limit = min(self.affinity_max_ongoing, self.load(by_load[0]) + self.affinity_imbalance + 1)
        holders = [r for r in by_load if model in self.resident(r) and self.load(r) < limit]
        picked = self._picked([holders, by_load] if holders else [by_load])
        self._assumed.setdefault(picked[0][0].replica_id, {})[model] = time.monotonic()
        return picked

    # ------------------------------------------------------------------------- helpers
    def _picked(self, ranks: list[list[RunningReplica]]) -> list[list[RunningReplica]]:
        """The route chooser takes the first replica of the first rank: count it sent."""
        replica_id = ranks[0][0].replica_id
        seq, sent = self._sent.get(replica_id, (None, []))
        sent.append(time.monotonic())
        self._sent[replica_id] = (seq, sent)
        return ranks

    def load(self, replica: RunningReplica) -> int:
        """Requests at the replica: its engine's last report (running + waiting) plus the
        requests sent to it since that report that are likely still running."""
        stats = replica.routing_stats or {}
        seq, sent = self._sent.get(replica.replica_id, (None, []))
        if stats.get("seq") != seq:  # a new report counts what was sent before it
            seq, sent = stats.get("seq"), []
            self._sent[replica.replica_id] = (seq, sent)
        horizon = time.monotonic() - float(stats.get("latency_s", STATS_PERIOD_S))
        sent[:] = [t for t in sent if t > horizon]
        return int(stats.get("running", 0)) + int(stats.get("waiting", 0)) + len(sent)

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
