"""The Ray Serve application: N engine replicas, each the ingress with its own HTTP server
behind Serve's HAProxy, and the route chooser HAProxy asks where each POST goes (which also
keeps the replicas' directory).

`build(settings, replicas)` is what `ragtune serve --replicas N` deploys; `build_app(args)` is
the import path for `serve run configs/ray/serve.yaml` (args: `config`, `replicas`).
Replicas scale between `serve.min_replicas` and `serve.max_replicas` when both are set
(target: `serve.target_ongoing_requests` in flight per replica), else stay at N.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ray.serve import Application
from ray.serve.config import AutoscalingConfig, RequestRouterConfig

from ragtune.config import Settings, load_settings
from server.auth import KeyStore
from server.deploy.haproxy_errors import HAPROXY_BINARY_VARIABLE, WRAPPER_NAME
from server.deploy.replica import EngineReplica
from server.deploy.route_chooser import RouteChooser
from server.deploy.router import STATS_PERIOD_S, AffinityRouter

logger = logging.getLogger(__name__)


def shared_settings(settings: Settings) -> tuple[dict[str, Any], KeyStore]:
    """What replicas get: settings without plaintext keys (their digests travel in a
    KeyStore instead), and a store even when none is configured (the local home), so
    admin changes reach every replica."""
    keys = KeyStore(settings.api_keys, settings.admin_keys, settings.api_key_file)
    data = settings.model_dump(mode="json")
    data.update(api_keys=[], admin_keys=[], api_key_file=None)
    if data["store"]["url"] is None:
        data["store"]["url"] = str(settings.home)
    return data, keys


def build(settings: Settings, replicas: int | None = None) -> Application:
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") != "1":
        raise ValueError(
            "ragtune on Ray Serve needs Serve's HAProxy ingress: start Ray (and `serve run`) "
            "with RAY_SERVE_ENABLE_HA_PROXY=1 and RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY=1 "
            "in the environment (docs/deploy.md); `ragtune serve --replicas` sets them itself"
        )
    if Path(os.environ.get(HAPROXY_BINARY_VARIABLE, "")).name != WRAPPER_NAME:
        logger.warning(
            "%s does not name %s here: HAProxy's own answers (no replica up, the route "
            "chooser restarting) reach clients as Serve's plain text, not OpenAI's error "
            "JSON, unless the cluster's `ray start` had it (docs/deploy.md)",
            HAPROXY_BINARY_VARIABLE,
            WRAPPER_NAME,
        )
    data, keys = shared_settings(settings)
    serve_config = settings.serve
    requested = replicas or serve_config.replicas  # the starting count, when given
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": serve_config.replica_cpus},
        "max_ongoing_requests": serve_config.max_ongoing_requests,
        # a model that cannot load fails every try the same way: report it soon
        "max_constructor_retry_count": 3,
        # in-flight requests finish on a stop, for up to a minute
        "graceful_shutdown_timeout_s": min(settings.limits.request_timeout_s, 60.0),
        "request_router_config": RequestRouterConfig(
            request_router_class=AffinityRouter,
            request_router_kwargs={
                "affinity_max_ongoing": serve_config.affinity_max_ongoing
                or settings.engine.max_batch_size,
                "affinity_imbalance": serve_config.affinity_imbalance,
            },
            request_routing_stats_period_s=STATS_PERIOD_S,
            request_routing_stats_timeout_s=5 * STATS_PERIOD_S,
        ),
    }
    if serve_config.autoscaling:
        low, high = serve_config.min_replicas, serve_config.max_replicas
        if requested is not None and not low <= requested <= high:
            raise ValueError(
                f"{requested} replicas to start with is outside the autoscaling bounds "
                f"serve.min_replicas..serve.max_replicas ({low}..{high})"
            )
        options["autoscaling_config"] = AutoscalingConfig(
            min_replicas=low,
            max_replicas=high,
            initial_replicas=requested or low,
            target_ongoing_requests=serve_config.target_ongoing_requests,
            upscale_delay_s=serve_config.upscale_delay_s,
            downscale_delay_s=serve_config.downscale_delay_s,
            look_back_period_s=serve_config.look_back_period_s,
        )
    else:
        options["num_replicas"] = requested or 1
    engines = EngineReplica.options(**options).bind(data, keys)
    # Serve's (internal, unstable) hook for this layout, the one Ray Serve LLM's direct
    # streaming uses: ray.llm._internal.serve.core.ingress.builder
    return engines._with_ingress_request_router(RouteChooser.bind(data, engines))


def build_app(args: dict[str, Any]) -> Application:
    """`serve run` entry point: settings from `args.config` (and the environment)."""
    settings = load_settings(args.get("config"))
    replicas = args.get("replicas")
    return build(settings, int(replicas) if replicas is not None else None)
