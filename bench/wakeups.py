"""What wake-ups cost an engine on the same cores (issue #18): Ray's idle processes each wake
every 10 ms, and each wake-up preempts one of the engine's spinning OpenMP threads. One JSON
line each.

    python bench/wakeups.py count --replicas 1          # an idle cluster's context switches/s
    python bench/wakeups.py sleepers --sleepers 0,20,10  # plain serve beside N wakers

count     starts an idle `--replicas N` cluster (or counts the machine as it is, with
          --replicas 0) and reports context switches a second per process over --seconds,
          with each process's busiest threads.
sleepers  plain `ragtune serve` alone and beside N processes that each sleep 10 ms in a loop
          (Ray's signal-check period): the c=1 inter-token gap (median, ms) and c=16 tok/s,
          for each N in turn, --rounds times.

Measure on a quiet machine only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.replicas import PROMPTS, SERVED_MODEL, closed_loop  # noqa: E402
from ragtune.launcher import start_server  # noqa: E402
from server.deploy.process import start_replicated  # noqa: E402

SLEEPER = "import time\nwhile True:\n    time.sleep(0.01)"


def switches() -> dict[tuple[int, str], dict[str, int]]:
    """Context switches so far, per process (pid, command) and thread name."""
    out: dict[tuple[int, str], dict[str, int]] = defaultdict(dict)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            for tid in os.listdir(f"/proc/{pid}/task"):
                status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
                count = sum(
                    int(line.split()[1]) for line in status.splitlines() if "ctxt_switches" in line
                )
                name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
                out[(int(pid), command[:60] or name)][f"{name}/{tid}"] = count
        except (OSError, IndexError, ValueError):
            continue  # a process or thread that ended meanwhile
    return out


def count(seconds: float) -> dict:
    before = switches()
    time.sleep(seconds)
    after = switches()
    rows = []
    for key, threads in after.items():
        rates = {
            name: (n - before[key][name]) / seconds
            for name, n in threads.items()
            if key in before and name in before[key]
        }
        if sum(rates.values()) > 0:
            busiest = sorted(rates.items(), key=lambda item: -item[1])[:4]
            top = {name.split("/")[0]: round(rate, 1) for name, rate in busiest}
            rows.append({"pid": key[0], "command": key[1],
                         "per_s": round(sum(rates.values()), 1), "threads": top})  # fmt: skip
    rows.sort(key=lambda row: -row["per_s"])
    return {"total_per_s": round(sum(row["per_s"] for row in rows), 1), "processes": rows[:15]}


def token_gap_ms(url: str, model: str, requests: int = 12) -> float:
    """Median gap between streamed tokens of one request at a time (64 tokens)."""
    body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[1]}],
            "max_tokens": 64, "temperature": 0, "stream": True}  # fmt: skip
    gaps = []
    with httpx.Client(timeout=120) as http:
        for number in range(requests + 2):
            stamps = []
            with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
                stamps += [
                    time.perf_counter() for line in response.iter_lines() if '"delta"' in line
                ]
            if number >= 2 and len(stamps) > 1:  # the first two warm up
                gaps.append((stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1000)
    return round(statistics.median(gaps), 3)


async def tokens_per_s(url: str, model: str, concurrency: int = 16, requests: int = 320) -> float:
    jobs = [(model, PROMPTS[i % len(PROMPTS)]) for i in range(requests)]
    await closed_loop(url, jobs[:concurrency], concurrency, 8, True, {})  # warm-up
    started = time.monotonic()
    results = await closed_loop(url, jobs, concurrency, 32, True, {})
    return round(sum(r["tokens"] for r in results) / (time.monotonic() - started), 1)


def sleepers(args, log_dir: Path) -> None:
    server = start_server({}, log_dir / "plain.log")
    try:
        for _ in range(args.rounds):
            for n in (int(x) for x in args.sleepers.split(",")):
                procs = [subprocess.Popen([sys.executable, "-c", SLEEPER]) for _ in range(n)]
                try:
                    time.sleep(1)
                    gap = token_gap_ms(server.base_url, args.model)
                    rate = asyncio.run(tokens_per_s(server.base_url, args.model))
                finally:
                    for proc in procs:
                        proc.kill()
                        proc.wait()
                row = {"bench": "sleepers", "sleepers": n, "wakeups_per_s": n * 100,
                       "c1_gap_ms": gap, "c16_tok_per_s": rate}  # fmt: skip
                print(json.dumps(row), flush=True)
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bench", choices=["count", "sleepers"])
    parser.add_argument("--replicas", type=int, default=1, help="count: 0 counts as it is")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--sleepers", default="0,20,10")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default=SERVED_MODEL)
    args = parser.parse_args()
    log_dir = Path(tempfile.mkdtemp(prefix="bench-wakeups-"))
    if args.bench == "sleepers":
        sleepers(args, log_dir)
        return
    cluster = (
        start_replicated({}, log_dir / "replicas.log", args.replicas) if args.replicas else None
    )
    try:
        time.sleep(5 if cluster else 0)  # past the start-up's own traffic
        print(json.dumps({"bench": "count", "replicas": args.replicas, **count(args.seconds)}))
    finally:
        if cluster is not None:
            cluster.stop()


if __name__ == "__main__":
    main()
