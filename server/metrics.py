"""Prometheus metrics, one registry per app (so several apps can live in one process).

Label values come only from bounded sets (routes, loaded model ids, finish reasons): a
client-sent model name that is not loaded is counted as "unknown", so hostile input cannot
grow the series without bound.

A Ray Serve replica renders every sample with a `replica` label; every replica merges the
replicas' pages into one (server/deploy/front.py).
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    Histogram,
    Info,
    Metric,
    generate_latest,
)

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
FAST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
UNKNOWN_MODEL = "unknown"


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, replica_id: str | None = None) -> None:
        self.replica_id = replica_id
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "ragtune_http_requests",
            "HTTP requests by route, model (base, adapter, or 'unknown') and status",
            ["route", "model", "status"],
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
        self.waiting = Gauge(
            "ragtune_sequences_waiting", "Requests waiting for a slot (queue depth)", registry=r
        )
        self.engine_threads = Gauge(
            "ragtune_engine_threads",
            "Threads in the engine's team now (fewer than the CPU share while other work "
            "holds its cores: model.threads auto)",
            registry=r,
        )
        self.engine_threads_fewest = Gauge(
            "ragtune_engine_threads_fewest",
            "The fewest threads the engine's team may shrink to: the smallest team that gives "
            "the full team's bits (checked at start-up); the team's size where it never shrinks",
            registry=r,
        )
        self.prefix_hit_tokens = Gauge(
            "ragtune_prefix_cache_hit_tokens",
            "Prompt tokens restored from the prefix cache instead of computed, since start",
            registry=r,
        )
        self.prefix_prompt_tokens = Gauge(
            "ragtune_prefix_cache_prompt_tokens",
            "Prompt tokens looked up in the prefix cache, since start (hit rate: hit / these)",
            registry=r,
        )
        self.batch_size = Histogram(
            "ragtune_batch_size",
            "Sequences in each engine step's forward pass",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.adapter_events = Counter(
            "ragtune_adapter_events",
            "Adapter loads (admin or preload), unloads, LRU evictions and reloads from disk",
            ["event", "result"],
            registry=r,
        )
        self.retrieval_latency = Histogram(
            "ragtune_retrieval_latency_seconds",
            "Retrieval time per request (query embedding + search + prompt assembly)",
            ["mode"],
            buckets=FAST_BUCKETS,
            registry=r,
        )
        self.feedback = Counter(
            "ragtune_feedback",
            "Ratings (POST /v1/feedback) by model (adapter name, or the base model), the "
            "adapter version that served the rated answer ('' for the base model) and rating",
            ["model", "version", "rating"],
            registry=r,
        )

        # per adapter version (labels from the registry: bounded), for canaries and rollbacks;
        # ratings per version are `ragtune_feedback` above
        self.adapter_requests = Counter(
            "ragtune_adapter_requests",
            "Generation requests an adapter version served, by outcome (ok|error)",
            ["adapter", "version", "outcome"],
            registry=r,
        )
        self.adapter_latency = Histogram(
            "ragtune_adapter_request_latency_seconds",
            "Whole-request latency per adapter version",
            ["adapter", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.canary_fraction = Gauge(
            "ragtune_canary_fraction",
            "Share of model=<adapter> traffic sent to the canary version (0 when none runs)",
            ["adapter", "version"],
            registry=r,
        )
        self.canary_state = Enum(
            "ragtune_canary_state",
            "The adapter's latest canary: running, stopped, rolled_back or promoted",
            ["adapter"],
            states=["running", "stopped", "rolled_back", "promoted"],
            registry=r,
        )
        self.canary_rollbacks = Counter(
            "ragtune_canary_rollbacks",
            "Canaries rolled back by themselves, by reason (error_rate|down_rate)",
            ["adapter", "reason"],
            registry=r,
        )

        self.engine_info = Info(
            "ragtune_engine",
            "The CPU kind and features detected at start-up and the kernels chosen for them",
            registry=r,
        )

    def watch_engine(self, engine) -> None:
        from ragtune.hardware import detect

        self.engine_info.info({**detect().as_labels(), **engine.runner.kernels()})
        self.running.set_function(lambda: engine.num_running)
        self.waiting.set_function(lambda: engine.num_waiting)
        self.engine_threads.set_function(lambda: engine.team.threads)
        self.engine_threads_fewest.set(engine.team.fewest)
        prefix = getattr(engine.runner, "prefix_cache", None)
        if prefix is not None:
            self.prefix_hit_tokens.set_function(lambda: prefix.hit_tokens)
            self.prefix_prompt_tokens.set_function(lambda: prefix.prompt_tokens)

    def render(self) -> bytes:
        if self.replica_id:
            return generate_latest(_Labelled(self.registry, {"replica": self.replica_id}))
        return generate_latest(self.registry)


class _Labelled:
    """Another collector's samples with extra labels (a constant `replica`, say)."""

    def __init__(self, collector, labels: dict[str, str]) -> None:
        self.collector = collector
        self.labels = labels

    def collect(self):
        for family in self.collector.collect():
            clone = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                clone.add_sample(
                    sample.name,
                    {**sample.labels, **self.labels},
                    sample.value,
                    sample.timestamp,
                    sample.exemplar,
                )
            yield clone
