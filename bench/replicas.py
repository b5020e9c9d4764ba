"""Scale-out on Ray Serve (issue #18): adapter affinity, failover, overhead. One JSON line each.

    python bench/replicas.py affinity  --replicas 2 --requests 96
    python bench/replicas.py failover  --replicas 2 --seconds 40 --kill-after 8
    python bench/replicas.py overhead  --replicas 1 --rounds 3        # plain serve vs Ray path
    python bench/replicas.py overhead  --replicas 1 --beside          # ... and plain beside Ray
    python bench/replicas.py beside    --replicas 1                   # plain serve beside idle Ray

affinity  loads 4 adapters through the admin API (so every replica knows them, their weights
          on disk until needed), then sends c=8 round-robin requests over the 4. A request is
          a hit when its replica (`X-Ragtune-Replica`) already had the adapter resident when
          it was sent: in the last `/v1/replicas` report, or because it served that adapter
          before. Reports the hit share and where each adapter ran.
failover  c=8 non-streamed load over the adapters; after --kill-after seconds SIGKILLs one
          replica (its pid from `/v1/replicas`). Reports failed requests that started before
          the kill (in flight) and after it (must be 0), and the seconds until that many
          replicas report ready again.
overhead  the same streamed load at c=1 and c=16 against plain `ragtune serve` and against
          `--replicas N`, alternately for --rounds rounds; tok/s, each round's ratio and
          their median. With --beside, each round also loads the plain server while the
          round's cluster is up and idle (before the Ray run in even rounds, after it in
          odd ones): Ray's presence and the Ray path apart.
beside    plain `ragtune serve` alone, then beside an idle `--replicas N` cluster (whose
          replicas serve nothing), then alone again: what Ray's own processes cost an engine
          on the same cores, apart from the request path.

The server runs with the environment of this process (RAGTUNE_MODEL__SOURCE etc.), or use
--url for one already running (--admin-key/--api-key). Measure on a quiet machine only.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ragtune.launcher import start_server  # noqa: E402
from server.deploy.process import start_replicated  # noqa: E402

# what a server started by these benches serves (the default model unless the environment says)
SERVED_MODEL = os.environ.get("RAGTUNE_MODEL__SERVED_MODEL_NAME") or "smollm2-135m-instruct"
PROMPTS = [
    "Explain how a refrigerator works.",
    "Write a short story about a lighthouse.",
    "Describe a market in a large city.",
    "How do you plant a vegetable garden?",
]


async def chat(http, url, model, prompt, max_tokens, stream, headers) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}]}
    body.update(max_tokens=max_tokens, temperature=0, stream=stream)
    started = time.monotonic()
    try:
        if not stream:
            response = await http.post(f"{url}/v1/chat/completions", json=body, headers=headers)
            tokens = response.json()["usage"]["completion_tokens"] if response.is_success else 0
            error = None if response.is_success else response.text[:300]
        else:
            body["stream_options"] = {"include_usage": True}
            tokens, error = 0, None
            async with http.stream(
                "POST", f"{url}/v1/chat/completions", json=body, headers=headers
            ) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: {") and '"usage":{' in line:
                        tokens = json.loads(line[6:])["usage"]["completion_tokens"]
                    if '"error"' in line:
                        response.status_code, error = 599, line[:300]
        status = response.status_code
        replica = response.headers.get("x-ragtune-replica")
    except httpx.HTTPError as exc:
        status, replica, tokens, error = type(exc).__name__, None, 0, repr(exc)[:300]
    return {
        "model": model,
        "status": status,
        "replica": replica,
        "tokens": tokens,
        "error": error,
        "start": started,
        "end": time.monotonic(),
    }


async def closed_loop(
    url, jobs, concurrency, max_tokens, stream, headers, on_start=None, on_done=None
):
    queue = list(jobs)
    results: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency * 2)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:

        async def worker() -> None:
            while queue:
                model, prompt = queue.pop(0)
                if on_start:
                    on_start(model)
                results.append(await chat(http, url, model, prompt, max_tokens, stream, headers))
                if on_done:
                    on_done(results[-1])

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def load_adapters(url: str, admin: dict, root: Path, names: list[str]) -> None:
    for name in names:
        body = {"lora_name": name, "lora_path": str(root / name), "version": "v1"}
        body["replace"] = True
        response = httpx.post(f"{url}/v1/load_lora_adapter", json=body, headers=admin, timeout=60)
        response.raise_for_status()


def replicas_now(url: str, admin: dict) -> list[dict]:
    """The replicas listed now; none while no replica can answer (one replica, restarting:
    HAProxy's 503)."""
    response = httpx.get(f"{url}/v1/replicas", headers=admin, timeout=10)
    if response.status_code == 503:
        return []
    response.raise_for_status()
    return response.json()["data"]


async def affinity(args, url: str, admin: dict, client: dict) -> dict:
    names = args.adapters.split(",")
    load_adapters(url, admin, Path(args.adapter_root), names)
    await asyncio.sleep(2)  # every replica registers them (weights stay on disk)
    resident: dict[str, set[str]] = {}
    served: dict[str, set[str]] = {}
    before: dict[int, dict[str, set[str]]] = {}

    async def poll() -> None:
        while True:
            for entry in await asyncio.to_thread(replicas_now, url, admin):
                resident[entry["id"]] = set(entry["resident_adapters"])
            await asyncio.sleep(0.2)

    for entry in replicas_now(url, admin):  # a first report before any request starts
        resident[entry["id"]] = set(entry["resident_adapters"])
    poller = asyncio.create_task(poll())
    jobs = list(zip(itertools.islice(itertools.cycle(names), args.requests),
                    itertools.cycle(PROMPTS), strict=False))  # fmt: skip
    counter = itertools.count()

    def on_start(model: str) -> None:
        snapshot = {r: set(s) for r, s in resident.items()}
        for replica, models in served.items():
            snapshot.setdefault(replica, set()).update(models)
        before[next(counter)] = snapshot

    def on_done(result: dict) -> None:
        served.setdefault(result["replica"], set()).add(result["model"])

    results = await closed_loop(url, jobs, 8, args.max_tokens, False, client, on_start, on_done)
    poller.cancel()
    hits = 0
    for i, result in enumerate(sorted(results, key=lambda r: r["start"])):
        if result["model"] in before.get(i, {}).get(result["replica"], set()):
            hits += 1
    placement: dict[str, dict[str, int]] = {}
    for result in results:
        row = placement.setdefault(result["model"], {})
        row[result["replica"]] = row.get(result["replica"], 0) + 1
    return {
        "bench": "affinity",
        "requests": len(results),
        "errors": sum(r["status"] != 200 for r in results),
        "failure_samples": sorted({r["error"] for r in results if r["status"] != 200})[:5],
        "affinity_hit_share": round(hits / max(len(results), 1), 3),
        "placement": placement,
    }


async def failover(args, url: str, admin: dict, client: dict) -> dict:
    names = args.adapters.split(",")
    load_adapters(url, admin, Path(args.adapter_root), names)
    before = replicas_now(url, admin)
    victim = before[0]
    deadline = time.monotonic() + args.seconds
    jobs = ((m, p) for m, p in zip(itertools.cycle(names), itertools.cycle(PROMPTS), strict=False))
    results: list[dict] = []

    async def load() -> None:
        async with httpx.AsyncClient(timeout=600) as http:

            async def worker() -> None:
                while time.monotonic() < deadline:
                    model, prompt = next(jobs)
                    results.append(
                        await chat(http, url, model, prompt, args.max_tokens, False, client)
                    )

            await asyncio.gather(*(worker() for _ in range(8)))

    task = asyncio.create_task(load())
    await asyncio.sleep(args.kill_after)
    victim = next(r for r in await asyncio.to_thread(replicas_now, url, admin)
                  if r["id"] == victim["id"])  # fmt: skip
    killed_at = time.monotonic()
    os.kill(victim["pid"], signal.SIGKILL)
    recovered_at = None
    while recovered_at is None and time.monotonic() - killed_at < 120:
        await asyncio.sleep(0.5)
        now = await asyncio.to_thread(replicas_now, url, admin)
        ids = {r["id"] for r in now if r["ready"]}
        if len(ids) >= len(before) and victim["id"] not in ids:
            recovered_at = time.monotonic()
    await task
    failed_before = [r for r in results if r["status"] != 200 and r["start"] < killed_at]
    failed_after = [r for r in results if r["status"] != 200 and r["start"] >= killed_at]
    return {
        "bench": "failover",
        "requests": len(results),
        "killed_replica": victim["id"],
        "in_flight_at_kill": victim["running"] + victim["waiting"],
        "failed_in_flight": len(failed_before),
        "failed_after_kill": len(failed_after),
        "failed_in_flight_statuses": dict(Counter(str(r["status"]) for r in failed_before)),
        "failed_after_kill_statuses": dict(Counter(str(r["status"]) for r in failed_after)),
        "failure_samples": sorted({r["error"] for r in failed_before + failed_after})[:5],
        "recovery_s": round(recovered_at - killed_at, 1) if recovered_at else None,
        "served_by": sorted({r["replica"] for r in results if r["replica"]}),
        "served_after_recovery": sorted(
            {r["replica"] for r in results if recovered_at and r["start"] > recovered_at}
        ),
    }


async def throughput(url: str, client: dict, model: str, args) -> dict:
    out = {}
    for concurrency in (1, 16):
        # c=16 gets 30 requests a worker: with 3 its load lasted a few seconds and the plain
        # server's own figure moved 30 % between runs (docs/deploy.md, stop 31)
        jobs = [(model, PROMPTS[i % 4]) for i in range(max(concurrency * 30, args.requests))]
        await closed_loop(url, jobs[:concurrency], concurrency, 8, True, client)  # warm-up
        started = time.monotonic()
        results = await closed_loop(url, jobs, concurrency, args.max_tokens, True, client)
        elapsed = time.monotonic() - started
        tokens = sum(r["tokens"] for r in results)
        out[f"c{concurrency}_tok_per_s"] = round(tokens / elapsed, 1)
        out[f"c{concurrency}_errors"] = sum(r["status"] != 200 for r in results)
    return out


def overhead(args, client: dict, log_dir: Path) -> dict:
    """Plain serve and the Ray path, alternately for --rounds rounds, each ratio from one round.
    The plain server stays up (idle, it costs the Ray run nothing) while a cluster is started
    for each Ray run and stopped before the next plain run: this machine's own speed drifts
    10-30 % within minutes, so one plain run and one Ray run compare their moments as much as
    their paths (docs/deploy.md, stop 32)."""
    plain = start_server({}, log_dir / "plain.log")
    rounds = []
    try:
        for number in range(args.rounds):
            single = asyncio.run(throughput(plain.base_url, client, args.model, args))
            server = start_replicated({}, log_dir / f"replicas{number}.log", args.replicas)
            try:  # --beside: the plain server again, the cluster up and idle beside it;
                # before the Ray run in even rounds, after it in odd ones (a cluster just
                # started may still be settling)
                beside_first = args.beside and number % 2 == 0
                if beside_first:
                    beside = asyncio.run(throughput(plain.base_url, client, args.model, args))
                ray_path = asyncio.run(throughput(server.base_url, client, args.model, args))
                if args.beside and not beside_first:
                    beside = asyncio.run(throughput(plain.base_url, client, args.model, args))
            finally:
                server.stop()
            rates = [k for k in single if k.endswith("tok_per_s")]
            ratio = {k: round(ray_path[k] / single[k], 3) for k in rates}
            rounds.append({"plain": single, "ray": ray_path, "ray_over_plain": ratio})
            if args.beside:
                rounds[-1].update(
                    plain_beside_ray=beside,
                    beside_over_plain={k: round(beside[k] / single[k], 3) for k in rates},
                    ray_over_beside={k: round(ray_path[k] / beside[k], 3) for k in rates},
                )
            print(json.dumps({"round": number, **rounds[-1]}), file=sys.stderr, flush=True)
    finally:
        plain.stop()
    ratios = [key for key in rounds[0] if "_over_" in key]
    medians = {
        name: {
            key: round(statistics.median(r[name][key] for r in rounds), 3)
            for key in rounds[0][name]
        }
        for name in ratios
    }
    return {"bench": "overhead", "replicas": args.replicas, "rounds": rounds,
            "median_ray_over_plain": medians["ray_over_plain"],
            "medians": medians}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bench", choices=["affinity", "failover", "overhead", "beside"])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--url", help="a running --replicas server (else one is started)")
    parser.add_argument("--adapter-root", default=os.environ.get("BENCH_ADAPTER_ROOT", ""))
    parser.add_argument("--adapters", default="ad0,ad1,ad2,ad3")
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=40)
    parser.add_argument("--kill-after", type=float, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="overhead: plain/Ray pairs")
    parser.add_argument(
        "--beside",
        action="store_true",
        help="overhead: also the plain server beside each round's idle cluster, before and "
        "after the Ray run in turn (what Ray's processes cost apart from the request path)",
    )
    parser.add_argument("--api-key", default=os.environ.get("RAGTUNE_API_KEYS", "").split(",")[0])
    parser.add_argument(
        "--admin-key", default=os.environ.get("RAGTUNE_ADMIN_KEYS", "").split(",")[0]
    )
    parser.add_argument("--model", default=SERVED_MODEL)
    args = parser.parse_args()
    client = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    admin = {"Authorization": f"Bearer {args.admin_key}"}
    log_dir = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
    if args.bench == "overhead":
        print(json.dumps(overhead(args, client, log_dir)))
        return
    if args.bench == "beside":
        plain = start_server({}, log_dir / "plain.log")
        try:
            alone = asyncio.run(throughput(plain.base_url, client, args.model, args))
            idle = start_replicated({}, log_dir / "replicas.log", args.replicas)
            try:
                beside = asyncio.run(throughput(plain.base_url, client, args.model, args))
            finally:
                idle.stop()
            again = asyncio.run(throughput(plain.base_url, client, args.model, args))
        finally:
            plain.stop()
        print(json.dumps({"bench": "beside", "replicas": args.replicas, "alone": alone,
                          "beside_idle_ray": beside, "alone_again": again}))  # fmt: skip
        return
    server = None
    if not args.url:
        server = start_replicated({}, log_dir / "replicas.log", args.replicas)
    url = args.url or server.base_url
    try:
        bench = affinity if args.bench == "affinity" else failover
        print(json.dumps(asyncio.run(bench(args, url, admin, client))), flush=True)
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
