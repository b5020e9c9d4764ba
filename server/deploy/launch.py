"""`ragtune serve --replicas N [--ray-address ADDR]`: start (or join) a Ray cluster, deploy
the application on Serve at the configured host and port, and stay up until SIGTERM or
Ctrl-C, then take the application down (and the local cluster with it).

Serve's HAProxy ingress is switched on through the environment (`SERVE_ENVIRONMENT`), which
Ray reads when it is imported: this process sets it before importing Ray, and a local
cluster's processes inherit it. A cluster joined with `--ray-address` must have been started
with the same variables (docs/deploy.md)."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

from ragtune.config import Settings
from ragtune.cpu_share import cpu_share
from ragtune.launcher import free_settled_port
from server.deploy.haproxy_errors import HAPROXY_BINARY_VARIABLE, WRAPPER_NAME

logger = logging.getLogger(__name__)

APP_NAME = "ragtune"

# HAProxy in front of the replicas' own HTTP servers, asking the route chooser where each POST
# goes (it reads the body's `model`). A replica that refuses the connection, or dies before
# it sends anything back, costs the request one retry on another replica (a stream whose
# first bytes went out cannot be retried). A stopping replica stops accepting after 5 s
# (HAProxy then retries elsewhere) instead of Serve's 30. One HAProxy thread relays far more
# than a node's replicas stream; Serve's default of 4 contends with the engine's threads on a
# small node. Each replica runs the app on Serve's own event loop, as plain serve runs it on
# uvicorn's (the app never blocks its loop: blocking work goes to threads), not on a second
# loop that every request and streamed message crosses: that hop cost the replica and the
# route chooser ~0.4 ms of CPU a request (bench/route_cost.py, docs/deploy.md stop 33).
SERVE_ENVIRONMENT = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY": "1",
    "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response",
    "RAY_SERVE_HAPROXY_RETRIES": "1",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5",
    "RAY_worker_niceness": "0",
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
    "RAY_SERVE_HAPROXY_NBTHREAD": "1",
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
}

# HAProxy headers beside the body in one buffer (its `tune.bufsize`)
HEADER_ROOM_BYTES = 64 * 1024


def router_buffer_bytes(settings: Settings) -> int:
    """HAProxy's buffer when it forwards bodies to the route chooser: room for the largest body
    a replica accepts (`limits.max_body_bytes`), so the chooser reads every accepted body
    whole (a longer one reaches it cut, and the replica answers it 413). Serve's default, 8 MiB,
    costs every request ~7 ms in HAProxy (docs/deploy.md, stop 32)."""
    return settings.limits.max_body_bytes + HEADER_ROOM_BYTES


def haproxy_wrapper() -> str | None:
    """The installed `ragtune-haproxy` script (Serve's HAProxy answering its own errors in
    OpenAI's shape: haproxy_errors.py): beside this interpreter, else on PATH."""
    beside = Path(sys.executable).with_name(WRAPPER_NAME)
    return str(beside) if os.access(beside, os.X_OK) else shutil.which(WRAPPER_NAME)


def run_replicated(settings: Settings, replicas: int, address: str | None) -> int:
    for name, value in SERVE_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    wrapper = haproxy_wrapper()
    if address is None and wrapper is not None and not os.environ.get(HAPROXY_BINARY_VARIABLE):
        # a cluster this process starts inherits it; one it joins has its own (docs/deploy.md)
        os.environ[HAPROXY_BINARY_VARIABLE] = wrapper
    os.environ.setdefault(
        "RAY_SERVE_HAPROXY_INGRESS_REQUEST_ROUTER_BUFSIZE", str(router_buffer_bytes(settings))
    )
    if address is None:  # HAProxy's stats page and exporter have fixed ports (8404, 9101) on
        # every interface: a second local cluster on the machine would collide there
        for name in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT"):
            os.environ.setdefault(name, str(free_settled_port()))
    try:
        import ray
        from ray import serve
    except ImportError:
        raise ValueError(
            "--replicas needs Ray Serve: pip install 'ragtune[ray]' (or '.[ray]')"
        ) from None
    from server.deploy.app import build

    local = address is None
    most = max(replicas, settings.serve.max_replicas or 0)  # autoscaling may add up to max
    cpus = most * settings.serve.replica_cpus
    if local:
        share = cpu_share().cpus
        if cpus > share:
            logger.warning(
                "%d replicas x %g CPUs exceed this machine's share of %g CPUs; they will "
                "compete for cores (set serve.replica_cpus lower, or use fewer replicas)",
                most,
                settings.serve.replica_cpus,
                share,
            )
        ray.init(
            address="local",  # a cluster of its own, even where one already runs here
            num_cpus=max(cpus, share),
            include_dashboard=False,
            namespace=APP_NAME,
            logging_level=logging.WARNING,
        )
    else:
        ray.init(address=address, namespace=APP_NAME, logging_level=logging.WARNING)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": settings.server.host, "port": settings.server.port})
        started = time.monotonic()
        try:
            serve.run(
                build(settings, replicas),
                name=APP_NAME,
                route_prefix="/",
                logging_config={"enable_access_log": False, "log_level": "WARNING"},
            )
        except RuntimeError as exc:  # a replica's constructor failed: say why
            raise ValueError(f"{exc} {_deployment_errors(serve)}") from None
        logger.info(
            "serving %s on http://%s:%d with %d replicas (ready in %.1fs, pid %d)",
            settings.model.served_model_name,
            settings.server.host,
            settings.server.port,
            replicas,
            time.monotonic() - started,
            os.getpid(),
        )
        print(f"ragtune: ready on http://{settings.server.host}:{settings.server.port}", flush=True)
        stop.wait()
        logger.info("stopping: draining the replicas")
        try:
            serve.delete(APP_NAME)
        except TimeoutError as exc:  # replicas past their graceful shutdown are killed
            logger.warning("stopping: %s", exc)
    finally:
        if local:
            serve.shutdown()
            ray.shutdown()
    return 0


def _deployment_errors(serve) -> str:
    """What Serve knows about failed deployments (e.g. `model failed to load: ...`)."""
    try:
        application = serve.status().applications[APP_NAME]
    except Exception:
        return ""
    messages = [
        f"{name}: {status.message}"
        for name, status in application.deployments.items()
        if status.message
    ]
    return " ".join(messages)[-2000:]
