"""Soak: closed-loop chat load over the base model and several LoRA adapters for N minutes
while adapters are hot-swapped through the admin API; prints one JSON report.

- load: `--concurrency` workers, each sending a streamed greedy chat completion and the next
  as soon as it finishes, round-robin over the base model and `--adapters` adapters;
- swaps: every `--swap-every` seconds one adapter gets a new version (load without
  activating, activate, unload the version before the previous one);
- watch: server RSS (psutil) every `--rss-every` seconds, latency per `--window-s` window.

The report: requests and errors by kind, RSS after warm-up / max / end and growth %, p50/p95
latency and time to first token per window, and the drift of p95 from the first window to the
last. Start a server (default), or point at one with `--url` (then `--admin-key`, and
`--adapter-dir` inside its adapter roots; its pid is found from the port or given by `--pid`).

    .venv/bin/python bench/soak.py [--minutes 10] [--concurrency 16] [--out soak.json]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import aiohttp
import psutil
from adapter_load import rss_mb
from serve_load import PROMPTS, one_request, percentile

from ragtune.config import default_home
from ragtune.launcher import start_server
from ragtune.random_adapter import ALL_PROJECTIONS, ATTENTION, MLP, make_adapter

BASE_MODEL = "smollm2-135m-instruct"
ADMIN_KEY = "soak-admin-key"
# (rank, targets) of the weight sets adapters cycle through; seeds differ per set.
SHAPES = [(8, ATTENTION), (16, ALL_PROJECTIONS), (4, MLP), (8, ALL_PROJECTIONS)]


@dataclass
class Soak:
    """Everything measured during the run (times in seconds since the load started)."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    rss: list[tuple[float, float]] = field(default_factory=list)
    swaps: list[dict[str, Any]] = field(default_factory=list)


def make_weight_sets(directory: Path, count: int) -> list[Path]:
    """`count` real PEFT adapters of the bundled model, used as the versions' files."""
    paths = []
    for i in range(count):
        rank, targets = SHAPES[i % len(SHAPES)]
        paths.append(make_adapter(directory / f"set-{i}", rank, targets, seed=100 + i))
    return paths


def server_pid(url: str) -> int | None:
    """The pid listening on the URL's port, if this user may see it."""
    port = urlparse(url).port
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN:
                return conn.pid
    except psutil.AccessDenied:
        pass
    return None


async def admin(http: aiohttp.ClientSession, url: str, path: str, body: dict | None) -> str | None:
    """POST an admin call; None when it succeeded, else the error kind."""
    try:
        async with http.post(f"{url}{path}", json=body) as response:
            await response.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        return type(exc).__name__
    return None if response.status == 200 else str(response.status)


async def swap_loop(
    http: aiohttp.ClientSession,
    url: str,
    names: list[str],
    weight_sets: list[Path],
    every: float,
    deadline: float,
    started: float,
    soak: Soak,
) -> None:
    """Every `every` s: next adapter gets version v<n> (load, activate); the version before
    its previous one is unloaded, so each adapter keeps two (one to roll back to)."""
    versions = {name: ["v0"] for name in names}
    for n in itertools.count(1):
        await asyncio.sleep(max(0.0, min(every, deadline - time.perf_counter())))
        if time.perf_counter() >= deadline:
            return
        name = names[n % len(names)]
        version = f"v{n}"
        path = weight_sets[n % len(weight_sets)]
        began = time.perf_counter()
        load = {"lora_name": name, "lora_path": str(path), "version": version, "activate": False}
        errors = {"load": await admin(http, url, "/load_lora_adapter", load)}
        if errors["load"] is None:
            activate = {"version": version}
            errors["activate"] = await admin(http, url, f"/adapters/{name}/activate", activate)
            versions[name].append(version)
        if len(versions[name]) > 2:
            old = versions[name].pop(0)
            body = {"lora_name": name, "version": old}
            errors["unload"] = await admin(http, url, "/unload_lora_adapter", body)
        soak.swaps.append(
            {
                "t": round(began - started, 1),
                "adapter": name,
                "version": version,
                "seconds": round(time.perf_counter() - began, 3),
                "errors": {op: kind for op, kind in errors.items() if kind},
            }
        )


async def rss_loop(pid: int, every: float, deadline: float, started: float, soak: Soak) -> None:
    while time.perf_counter() < deadline:
        soak.rss.append((round(time.perf_counter() - started, 1), rss_mb(pid)))
        await asyncio.sleep(every)
    soak.rss.append((round(time.perf_counter() - started, 1), rss_mb(pid)))


async def load_loop(
    http: aiohttp.ClientSession,
    args: argparse.Namespace,
    models: list[str],
    deadline: float,
    started: float,
    soak: Soak,
) -> None:
    """`--concurrency` closed-loop workers until the deadline (requests in flight finish)."""
    jobs = itertools.cycle(itertools.product(PROMPTS, models))

    async def worker() -> None:
        while time.perf_counter() < deadline:
            prompt, model = next(jobs)
            try:
                result = await one_request(http, args.url, model, prompt, args.max_tokens, True, {})
            except (aiohttp.ClientError, TimeoutError) as exc:
                result = {"ok": False, "status": type(exc).__name__}
            soak.requests.append({**result, "model": model, "t": time.perf_counter() - started})

    await asyncio.gather(*[worker() for _ in range(args.concurrency)])


def seconds3(value: float) -> float | None:
    """Rounded, or None for the NaN `percentile` gives an empty list (not valid JSON)."""
    return None if value != value else round(value, 3)


def window_stats(soak: Soak, window_s: float, seconds: float) -> list[dict]:
    """Per window of completion time (late finishers count in the last window), with the
    window's largest RSS sample: a plateau once every adapter holds two versions is expected,
    steady growth after it is a leak."""
    requests = soak.requests
    count = max(1, round(seconds / window_s))
    windows: list[list[dict[str, Any]]] = [[] for _ in range(count)]
    for request in requests:
        windows[min(count - 1, int(request["t"] // window_s))].append(request)
    stats = []
    for index, window in enumerate(windows):
        ok = [r for r in window if r["ok"]]
        latencies = [r["latency"] for r in ok]
        ttfts = [r["ttft"] for r in ok if r.get("ttft") is not None]
        rss = [mb for t, mb in soak.rss if index * window_s <= t < (index + 1) * window_s]
        stats.append(
            {
                "start_s": round(index * window_s),
                "requests": len(window),
                "errors": len(window) - len(ok),
                "latency_p50_s": seconds3(percentile(latencies, 50)),
                "latency_p95_s": seconds3(percentile(latencies, 95)),
                "ttft_p50_s": seconds3(percentile(ttfts, 50)),
                "tok_per_s": round(sum(r["tokens"] for r in ok) / window_s, 1),
                "rss_max_mb": max(rss, default=None),
            }
        )
    return stats


def build_report(args: argparse.Namespace, soak: Soak, seconds: float, models: list[str]) -> dict:
    errors: dict[str, int] = {}
    for request in soak.requests:
        if not request["ok"]:
            kind = str(request["status"])
            errors[kind] = errors.get(kind, 0) + 1
    for swap in soak.swaps:
        for op, kind in swap["errors"].items():
            errors[f"swap-{op}:{kind}"] = errors.get(f"swap-{op}:{kind}", 0) + 1
    windows = window_stats(soak, args.window_s, seconds)
    first, last = windows[0]["latency_p95_s"], windows[-1]["latency_p95_s"]
    rss = [mb for _, mb in soak.rss]
    return {
        "minutes": args.minutes,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "models": models,
        "requests": len(soak.requests),
        "ok": sum(r["ok"] for r in soak.requests),
        "errors": errors,
        "swaps": len(soak.swaps),
        "swap_seconds_p50": seconds3(percentile([s["seconds"] for s in soak.swaps], 50)),
        "rss_mb": {
            "start": rss[0],
            "max": max(rss),
            "end": rss[-1],
            "growth_pct": round(100 * (rss[-1] - rss[0]) / rss[0], 1),
            "samples": soak.rss,
        }
        if rss
        else None,
        "windows": windows,
        "p95_drift_pct": round(100 * (last - first) / first, 1) if first and last else None,
        "cpu_count": psutil.cpu_count(),
    }


async def soak_run(args: argparse.Namespace, pid: int | None, weight_sets: list[Path]) -> dict:
    names = [f"soak-{i}" for i in range(args.adapters)]
    models = [BASE_MODEL, *names]
    headers = {"Authorization": f"Bearer {args.admin_key}"} if args.admin_key else {}
    timeout = aiohttp.ClientTimeout(total=600)
    connector = aiohttp.TCPConnector(limit=args.concurrency * 2)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector, headers=headers) as http:
        for i, name in enumerate(names):
            load = {"lora_name": name, "lora_path": str(weight_sets[i]), "version": "v0"}
            if kind := await admin(http, args.url, "/load_lora_adapter", load):
                raise RuntimeError(f"could not load {name}: {kind}")
        # warm-up: every model once, then one full batch, before the RSS baseline
        for model in models:
            await one_request(http, args.url, model, PROMPTS[0], 8, True, {})
        await asyncio.gather(
            *[
                one_request(http, args.url, models[i % len(models)], PROMPTS[i % 6], 16, True, {})
                for i in range(args.concurrency)
            ]
        )
        soak = Soak()
        started = time.perf_counter()
        deadline = started + args.minutes * 60
        tasks = [
            load_loop(http, args, models, deadline, started, soak),
            swap_loop(http, args.url, names, weight_sets, args.swap_every, deadline, started, soak),
        ]
        if pid is not None:
            tasks.append(rss_loop(pid, args.rss_every, deadline, started, soak))
        await asyncio.gather(*tasks)
        seconds = time.perf_counter() - started
        for name in names:
            await admin(http, args.url, "/unload_lora_adapter", {"lora_name": name})
    return build_report(args, soak, seconds, models)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=3, help="adapters besides the base")
    parser.add_argument("--swap-every", type=float, default=30, help="seconds between swaps")
    parser.add_argument("--window-s", type=float, default=60, help="latency window length")
    parser.add_argument("--rss-every", type=float, default=5, help="seconds between samples")
    parser.add_argument("--url", help="an already running server's /v1 URL")
    parser.add_argument("--pid", type=int, help="its pid, for RSS (default: found by port)")
    parser.add_argument("--admin-key", help="its admin key (with --url)")
    parser.add_argument("--adapter-dir", type=Path, help="where adapters go (inside its roots)")
    parser.add_argument("--out", type=Path, help="also write the report to this JSON file")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ragtune-soak-"))
    server = None
    try:
        if args.url is None:
            adapter_dir = args.adapter_dir or work / "adapters"
            weight_sets = make_weight_sets(adapter_dir, args.adapters + 1)
            env = {
                "RAGTUNE_ADMIN_KEYS": ADMIN_KEY,
                "RAGTUNE_ADAPTERS__ROOTS": json.dumps([str(adapter_dir)]),
                "RAGTUNE_AUDIT_LOG": str(work / "audit.log"),
                "RAGTUNE_SERVER__LOG_LEVEL": "warning",
            }
            server = start_server(env, work / "server.log", ready_timeout=900)
            args.url, args.admin_key, pid = server.v1, ADMIN_KEY, server.process.pid
        else:
            adapter_dir = args.adapter_dir or default_home() / "adapters" / f"soak-{os.getpid()}"
            weight_sets = make_weight_sets(adapter_dir, args.adapters + 1)
            pid = args.pid or server_pid(args.url)
        report = asyncio.run(soak_run(args, pid, weight_sets))
        if server is not None and server.process.poll() is not None:
            report["server_exit_code"] = server.process.returncode
    finally:
        if server is not None:
            server.stop()
        elif args.adapter_dir is None and args.url is not None:
            shutil.rmtree(adapter_dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(report)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    print(text)


if __name__ == "__main__":
    main()
