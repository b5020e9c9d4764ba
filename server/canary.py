"""Canary versions of an adapter: a share of `model=<name>` traffic goes to a candidate
version, each version's outcomes are counted, and the canary is rolled back by itself when
its error rate or down-rating rate passes the configured threshold (`canary` config section).

The split is a smooth weighted round robin (a running credit, as nginx weights upstreams), so
30 % means 3 of every 10 requests, not 30 % on average over a long run. Requests naming a
version (`name@version`) or the base model are never split. A canary whose weights cannot be
resolved (its files changed on disk, say) counts the failure against the canary and the
request is served by the active version, so clients see no failed request.

Ratings arrive from the feedback route through `observe_rating` (a rating listener on the
server state), responses from the request middleware through `observe_response`
(server/attribution.py says which version served).
State is per process: on Ray Serve only the replica that took the admin call
splits its traffic (not shared through the store yet).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ragtune.audit import AuditLog
from ragtune.config import CanaryConfig
from server.adapters.errors import AdapterError, AdapterNotFoundError, AdapterUnavailableError
from server.metrics import Metrics

logger = logging.getLogger(__name__)

RATINGS = ("up", "down")
W = TypeVar("W")


@dataclass
class Counts:
    requests: int = 0
    errors: int = 0
    ratings: int = 0
    downs: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": round(self.errors / self.requests, 4) if self.requests else None,
            "ratings": self.ratings,
            "downs": self.downs,
            "down_rate": round(self.downs / self.ratings, 4) if self.ratings else None,
        }


@dataclass
class Canary:
    adapter: str
    version: str
    fraction: float
    started_by: str | None = None
    started_at: float = field(default_factory=time.time)
    state: str = "running"  # running | stopped | rolled_back | promoted
    reason: str | None = None  # why it ended
    ended_at: float | None = None
    credit: float = 0.0
    routed: int = 0  # model=<adapter> requests sent to the canary
    split: int = 0  # model=<adapter> requests seen while it ran
    counts: dict[str, Counts] = field(default_factory=dict)  # version -> since the start

    def describe(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter,
            "version": self.version,
            "fraction": self.fraction,
            "state": self.state,
            "reason": self.reason,
            "started_by": self.started_by,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "routed": self.routed,
            "split": self.split,
            "versions": {v: c.as_dict() for v, c in self.counts.items()},
        }


class CanaryRouter:
    def __init__(self, config: CanaryConfig, metrics: Metrics, audit: AuditLog) -> None:
        self.config = config
        self.metrics = metrics
        self.audit = audit
        self._canaries: dict[str, Canary] = {}  # adapter -> its latest canary (ended ones too)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------- admin
    def start(self, adapter: str, version: str, fraction: float, by: str | None) -> Canary:
        """Begin (or replace) the adapter's canary; counters start from zero."""
        canary = Canary(adapter, version, fraction, started_by=by)
        with self._lock:
            previous = self._canaries.get(adapter)
            if previous is not None and previous.state == "running":
                self.metrics.canary_fraction.labels(adapter, previous.version).set(0)
            self._canaries[adapter] = canary
        self.metrics.canary_fraction.labels(adapter, version).set(fraction)
        self.metrics.canary_state.labels(adapter).state("running")
        logger.info("canary %s@%s at %.0f %%", adapter, version, fraction * 100)
        return canary

    def stop(self, adapter: str, state: str = "stopped", reason: str | None = None) -> Canary:
        """End the adapter's running canary; traffic goes back to the active version.
        Raises AdapterNotFoundError when none runs."""
        with self._lock:
            canary = self._canaries.get(adapter)
            if canary is None or canary.state != "running":
                raise AdapterNotFoundError(f"adapter {adapter} has no running canary")
            _mark_ended(canary, state, reason)
        self._ended(canary)
        return canary

    def promoted(self, adapter: str, version: str) -> Canary | None:
        """`version` became the active one: a canary of that very version ends as promoted."""
        running = self.running(adapter)
        if running is None or running.version != version:
            return None
        try:
            return self.stop(adapter, "promoted", "its version was activated")
        except AdapterNotFoundError:  # ended meanwhile
            return None

    def running(self, adapter: str) -> Canary | None:
        with self._lock:
            canary = self._canaries.get(adapter)
            return canary if canary is not None and canary.state == "running" else None

    def describe(self, adapter: str) -> dict[str, Any] | None:
        with self._lock:
            canary = self._canaries.get(adapter)
            return canary.describe() if canary is not None else None

    # ----------------------------------------------------------------------------- routing
    def route(self, model: str) -> str:
        """The model id to serve: `name@canary` for the canary's share of plain `name`
        requests, else `model` unchanged."""
        if "@" in model:
            return model
        with self._lock:
            canary = self._canaries.get(model)
            if canary is None or canary.state != "running":
                return model
            canary.split += 1
            canary.credit += canary.fraction
            if canary.credit < 1 - 1e-9:
                return model
            canary.credit -= 1
            canary.routed += 1
            return f"{model}@{canary.version}"

    def resolve(self, model: str, resolve: Callable[[str], W]) -> W:
        """Resolve `model` after the split (blocking, like `resolve`); a canary that cannot
        be resolved counts as a failed canary request and the active version serves."""
        routed = self.route(model)
        if routed == model:
            return resolve(model)
        try:
            return resolve(routed)
        except (AdapterError, AdapterNotFoundError, AdapterUnavailableError) as exc:
            logger.warning("canary %s failed (%s); served by the active version", routed, exc)
            name, _, version = routed.partition("@")
            self.observe_response(name, version, ok=False, latency_s=None)
            return resolve(model)

    # --------------------------------------------------------------------------- observing
    def observe_response(
        self, adapter: str, version: str, ok: bool, latency_s: float | None
    ) -> None:
        """One request an adapter version served (or failed); may roll its canary back."""
        self.metrics.adapter_requests.labels(adapter, version, "ok" if ok else "error").inc()
        if latency_s is not None:
            self.metrics.adapter_latency.labels(adapter, version).observe(latency_s)
        verdict = None
        with self._lock:
            canary = self._canaries.get(adapter)
            if canary is None or canary.state != "running":
                return
            counts = canary.counts.setdefault(version, Counts())
            counts.requests += 1
            counts.errors += not ok
            if version == canary.version:
                verdict = self._judge_errors(counts)
                if verdict:  # ended here, so no request after this one counts or routes
                    _mark_ended(canary, "rolled_back", verdict)
        if verdict:
            self._rolled_back(canary)

    def observe_rating(self, adapter: str | None, version: str | None, rating: str) -> None:
        """A rating (`up` | `down`) of an answer an adapter version gave (adapter None: the
        base model's); may roll its canary back. The feedback route calls this for every
        rating it records."""
        if adapter is None or version is None or rating not in RATINGS:
            return
        verdict = None
        with self._lock:
            canary = self._canaries.get(adapter)
            if canary is None or canary.state != "running":
                return
            counts = canary.counts.setdefault(version, Counts())
            counts.ratings += 1
            counts.downs += rating == "down"
            if version == canary.version:
                verdict = self._judge_ratings(counts)
                if verdict:
                    _mark_ended(canary, "rolled_back", verdict)
        if verdict:
            self._rolled_back(canary)

    # ----------------------------------------------------------------------------- helpers
    def _judge_errors(self, counts: Counts) -> str | None:
        config = self.config
        judged = counts.requests >= config.min_requests
        if judged and counts.errors / counts.requests > config.max_error_rate:
            return "error_rate"
        return None

    def _judge_ratings(self, counts: Counts) -> str | None:
        config = self.config
        judged = counts.ratings >= config.min_ratings
        if judged and counts.downs / counts.ratings > config.max_down_rate:
            return "down_rate"
        return None

    def _ended(self, canary: Canary) -> None:
        self.metrics.canary_fraction.labels(canary.adapter, canary.version).set(0)
        self.metrics.canary_state.labels(canary.adapter).state(canary.state)
        logger.info(
            "canary %s@%s ended: %s (%s)",
            canary.adapter,
            canary.version,
            canary.state,
            canary.reason,
        )

    def _rolled_back(self, canary: Canary) -> None:
        """Publish a rollback decided under the lock: metrics, log, audit."""
        self._ended(canary)
        adapter, version, reason = canary.adapter, canary.version, canary.reason or ""
        self.metrics.canary_rollbacks.labels(adapter, reason).inc()
        counts = canary.counts.get(version, Counts()).as_dict()
        limit = self.config.max_error_rate if reason == "error_rate" else self.config.max_down_rate
        logger.warning("canary %s@%s rolled back: %s %s", adapter, version, reason, counts)
        self.audit.record(
            None,
            "canary_rollback",
            "ok",
            adapter=adapter,
            version=version,
            trigger="automatic",
            reason=reason,
            threshold=limit,
            fraction=canary.fraction,
            **counts,
        )


def _mark_ended(canary: Canary, state: str, reason: str | None) -> None:
    """Under the router's lock: from now on the canary neither routes nor counts."""
    canary.state, canary.reason, canary.ended_at = state, reason, time.time()
