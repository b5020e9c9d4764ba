"""Adapter-affinity routing: a request for adapter X goes to a replica that has X's weights
in memory, unless that replica is overloaded; otherwise to the least loaded replica (fewest
resident adapters on a tie), which then loads X. Base-model and RAG requests go to the least
loaded replica. Overloaded: `affinity_max_ongoing` requests in flight, or more than
`affinity_imbalance` above the least loaded replica (else a replica that holds every adapter
would keep all traffic while a new or restarted one stays idle).

Why not Serve's own multiplexing (`@serve.multiplexed`): its list of a replica's models is
its own LRU of loader calls, which knows nothing of adapters unloaded through the admin API
or evicted by the registry. Here each replica reports the registry's resident ids in
`record_routing_stats` (every `STATS_PERIOD_S`); a request this router just sent to a replica
counts as resident there at once (the replica is loading it), so a burst for a cold adapter
does not load it everywhere before the next report. Serve itself then picks, within the
first rank that has room, the replica with the fewest requests in flight.
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

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        model = pending_request.metadata.multiplexed_model_id if pending_request else ""
        if not model:  # ties at random: idle replicas share the work
            return [sorted(candidate_replicas, key=lambda r: (self.load(r), random.random()))]
        # a cold adapter goes where the fewest adapters are resident (ties at random)
        by_load = sorted(
            candidate_replicas,
            key=lambda r: (self.load(r), len(self.resident(r)), random.random()),
        )
        limit = min(self.affinity_max_ongoing, self.load(by_load[0]) + self.affinity_imbalance + 1)
        holders = [r for r in by_load if model in self.resident(r) and self.load(r) < limit]
        return [holders, by_load] if holders else [by_load]

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any
    ) -> None:
        model = pending_request.metadata.multiplexed_model_id
        if model:
            self._assumed.setdefault(replica_id, {})[model] = time.monotonic()

    # ------------------------------------------------------------------------- helpers
    def load(self, replica: RunningReplica) -> int:
        """Requests in flight at the replica: Serve's own count when fresh, else the last
        report of the replica's engine (running + waiting)."""
        cached = self.replica_queue_len_cache.get(replica.replica_id)
        if cached is not None:
            return cached
        stats = replica.routing_stats or {}
        return int(stats.get("running", 0)) + int(stats.get("waiting", 0))

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
