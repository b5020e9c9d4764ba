"""Scale-out settings: the `serve` section of Settings (ragtune/config.py), for `ragtune serve
--replicas N` on Ray Serve (server/deploy/) and the prefix cache's tenants."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

# How often a Serve replica reports its load to the autoscaler (Serve's default; its own
# option for it is deprecated in Ray 2.60)
SERVE_METRICS_INTERVAL_S = 10.0


class ServeConfig(BaseModel):
    """`ragtune serve --replicas N` on Ray Serve (server/deploy/, docs/deploy.md)."""

    model_config = ConfigDict(extra="forbid")

    replicas: int | None = Field(
        None, ge=1, description="Engine replicas on Ray Serve (--replicas); unset: one process."
    )
    ray_address: str | None = Field(
        None, description="Ray cluster to join (--ray-address; 'auto'); unset: start one."
    )
    min_replicas: int | None = Field(
        None,
        ge=1,
        description="Autoscaling lower bound (at least 1: scaling from zero through "
        "HAProxy is unproven, docs/deploy.md).",
    )
    max_replicas: int | None = Field(None, ge=1, description="Autoscaling upper bound.")
    target_ongoing_requests: float = Field(
        8, gt=0, description="Autoscaling target: requests in flight per replica."
    )
    # Serve's AutoscalingConfig options of the same names, with its defaults
    upscale_delay_s: float = Field(
        30, ge=0, description="Autoscaling: load above target this long adds replicas."
    )
    downscale_delay_s: float = Field(
        600, ge=0, description="Autoscaling: load below target this long removes replicas."
    )
    look_back_period_s: float = Field(
        30,
        gt=SERVE_METRICS_INTERVAL_S,
        description="Autoscaling: the window load is averaged over (longer than the 10 s "
        "between a replica's load reports).",
    )
    replica_cpus: float = Field(
        1.0, gt=0, description="CPUs Ray reserves for each replica (its torch threads too)."
    )
    max_ongoing_requests: int = Field(
        64, ge=1, description="Requests one replica holds at once; more wait in the router."
    )
    affinity_max_ongoing: int | None = Field(
        None,
        ge=1,
        description="A replica holding a request's adapter takes it unless this many "
        "requests are in flight there; default engine.max_batch_size.",
    )
    affinity_imbalance: int = Field(
        4,
        ge=0,
        description="... or unless it has more than this many requests in flight above the "
        "least loaded replica (which then takes the request and loads the adapter).",
    )
    shared_prefix_cache: bool = Field(
        False,
        description="All API keys are one tenant: prompts share prefix-cache blocks. Off: "
        "blocks are keyed by the key's id (and a request's cache_salt).",
    )
    tenants: dict[str, list[str]] = Field(
        default_factory=dict,
        description="tenant -> key ids (8 hex digits, as in the audit log) sharing blocks.",
    )

    @model_validator(mode="after")
    def _bounds(self) -> ServeConfig:
        low, high = self.min_replicas, self.max_replicas
        if (low is None) != (high is None):
            raise ValueError(
                "autoscaling needs both serve.min_replicas and serve.max_replicas (or neither)"
            )
        if low is not None and high is not None and low > high:
            raise ValueError("serve.min_replicas must not exceed serve.max_replicas")
        return self

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None and self.max_replicas is not None
