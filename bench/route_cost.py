"""What one request costs each process (issue #18): CPU milliseconds per request, by process,
for a cheap POST (`/tokenize`) sent one at a time, on plain `ragtune serve` and through the
Ray path (HAProxy -> route chooser -> replica). CPU time per request is steady where
throughput drifts with the machine, so this shows where the Ray path's per-request cost goes.
One JSON line per server.

    python bench/route_cost.py --requests 1000

Measure on a quiet machine only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.replicas import SERVED_MODEL  # noqa: E402
from ragtune.launcher import start_server  # noqa: E402
from server.deploy.process import start_replicated  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_by_process() -> dict[int, tuple[str, float]]:
    """CPU seconds so far (user + system) and a short name, per process."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue  # ended meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()
        words = command.split() or [stat[stat.index("(") + 1 : stat.rindex(")")]]
        name = words[0] if words[0].startswith("ray::") else Path(words[0]).name
        if "ragtune.cli" in command:
            name = "ragtune serve" + (" (Ray driver)" if "--replicas" in command else "")
        out[int(pid)] = (name, (int(fields[11]) + int(fields[12])) / TICKS)
    return out


def cost(base_url: str, model: str, requests: int) -> dict:
    body = {"model": model, "prompt": "Where are pallets weighed?"}
    latencies = []
    with httpx.Client(timeout=60) as http:
        for _ in range(50):  # warm-up
            http.post(f"{base_url}/tokenize", json=body).raise_for_status()
        before = cpu_by_process()
        for _ in range(requests):
            started = time.perf_counter()
            http.post(f"{base_url}/tokenize", json=body).raise_for_status()
            latencies.append(time.perf_counter() - started)
        after = cpu_by_process()
    per_name: dict[str, float] = {}
    for pid, (name, seconds) in after.items():
        if pid in before and pid != os.getpid():
            per_name[name] = per_name.get(name, 0.0) + seconds - before[pid][1]
    busiest = sorted(per_name.items(), key=lambda item: -item[1])[:8]
    return {
        "median_latency_ms": round(statistics.median(latencies) * 1000, 2),
        "client_cpu_ms": round(
            (after[os.getpid()][1] - before[os.getpid()][1]) / requests * 1000, 3
        ),
        "cpu_ms_per_request": {name: round(s / requests * 1000, 3) for name, s in busiest if s > 0},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--model", default=SERVED_MODEL)
    args = parser.parse_args()
    log_dir = Path(tempfile.mkdtemp(prefix="bench-route-cost-"))
    for path in ("plain", "ray"):
        if path == "plain":
            server = start_server({}, log_dir / "plain.log")
        else:
            server = start_replicated({}, log_dir / "replicas.log", 1)
        try:
            time.sleep(5)  # past the start-up's own traffic
            row = {
                "bench": "route_cost",
                "path": path,
                **cost(server.base_url, args.model, args.requests),
            }
            print(json.dumps(row), flush=True)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
