"""Prometheus metrics, one registry per app (so several apps can live in one process)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "ragtune_http_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=r,
        )
        self.generations = Counter(
            "ragtune_generations",
            "Finished generations by model",
            ["model", "finish_reason"],
            registry=r,
        )
        self.tokens = Counter(
            "ragtune_tokens",
            "Tokens by model and kind (prompt|completion)",
            ["model", "kind"],
            registry=r,
        )
        self.latency = Histogram(
            "ragtune_request_latency_seconds",
            "Generation latency",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "ragtune_time_to_first_token_seconds",
            "Time to first token",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.running = Gauge(
            "ragtune_sequences_running", "Sequences in the running batch", registry=r
        )
        self.waiting = Gauge("ragtune_sequences_waiting", "Requests waiting for a slot", registry=r)

    def watch_engine(self, running: Callable[[], float], waiting: Callable[[], float]) -> None:
        self.running.set_function(running)
        self.waiting.set_function(waiting)

    def render(self) -> bytes:
        return generate_latest(self.registry)
