"""`ragtune serve`: build the app from settings and run it under uvicorn."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

import uvicorn

from ragtune.config import load_settings
from server.memory import limit_arenas


def add_serve_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="Run the OpenAI-compatible server.")
    parser.add_argument("--config", help="YAML config file (default: configs/default.yaml)")
    parser.add_argument("--host", help="bind address (server.host)")
    parser.add_argument("--port", type=int, help="bind port (server.port)")
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="load a PEFT LoRA adapter at start (repeatable; adds to adapters.preload)",
    )
    parser.add_argument(
        "--replicas",
        type=int,
        metavar="N",
        help="serve with N engine replicas on Ray Serve (serve.replicas; needs ragtune[ray])",
    )
    parser.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="with --replicas: join this Ray cluster ('auto': the running one) instead of "
        "starting one (serve.ray_address)",
    )
    parser.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from server.app import create_app
    from server.logs import configure_logging

    overrides: dict = {"server": {}}
    if args.host:
        overrides["server"]["host"] = args.host
    if args.port is not None:
        overrides["server"]["port"] = args.port
    if args.replicas is not None or args.ray_address:
        overrides["serve"] = {"replicas": args.replicas, "ray_address": args.ray_address}
        overrides["serve"] = {k: v for k, v in overrides["serve"].items() if v is not None}
    settings = load_settings(args.config, _without_empty(overrides))
    for spec in args.adapter:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter expects NAME=PATH, got {spec!r}")
        settings.adapters.preload[name] = path
    configure_logging(settings.server.log_level, settings.server.log_format)
    serve = settings.serve
    if not serve.replicas and (serve.autoscaling or serve.ray_address):
        what = (
            "serve.min_replicas/serve.max_replicas scale replicas on Ray Serve"
            if serve.autoscaling
            else "--ray-address (serve.ray_address) names a Ray cluster for replicas"
        )
        raise ValueError(
            f"{what}: start them with --replicas N (serve.replicas, the starting count), "
            "or remove it to serve from one process"
        )
    if serve.replicas:
        from server.deploy.launch import run_replicated

        return run_replicated(settings, serve.replicas, serve.ray_address)
    limit_arenas()
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.server.host,
        port=settings.server.port,
        log_level=settings.server.log_level,
        log_config=None,  # keep our handlers (request ids, JSON)
        timeout_graceful_shutdown=int(settings.limits.request_timeout_s),
    )
    DrainingServer(config, app.state.ragtune).run()
    return 0


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT: mark the app draining (new requests get 503, /ready turns 503),
    then uvicorn closes the listener and waits for in-flight requests to finish; the engine
    drains last, in the app's lifespan shutdown."""

    def __init__(self, config: uvicorn.Config, state) -> None:
        super().__init__(config)
        self._state = state

    def handle_exit(self, sig: int, frame) -> None:
        self._state.draining = True
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            # uvicorn re-raises the signal after shutdown; a fully drained stop is a clean
            # exit (status 0), so supervisors do not report a crash.
            self._captured_signals.clear()


def _without_empty(data: dict) -> dict:
    return {k: v for k, v in data.items() if v != {}}
