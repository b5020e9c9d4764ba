"""Start-up and single-request figures for the bundled model; prints one JSON line.

- first run: an empty RAGTUNE_HOME, so the GGUF is converted (seconds until /ready);
- warm restart: the same home again (seconds until /ready; the median of --restarts);
- server RSS after a few requests; single-request decode speed (c=1, greedy, 128 tokens).

    python bench/startup.py [--skip-first-run] [--restarts N]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from ragtune.launcher import start_server


def time_to_ready(home: Path, log: Path) -> tuple[float, object]:
    started = time.perf_counter()
    server = start_server(
        {"RAGTUNE_HOME": str(home), "RAGTUNE_SERVER__LOG_LEVEL": "warning"}, log, ready_timeout=900
    )
    return time.perf_counter() - started, server


def single_request_speed(base_url: str, runs: int = 3) -> float:
    body = {
        "model": "smollm2-135m-instruct",
        "max_tokens": 128,
        "temperature": 0,
        "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
    }
    speeds = []
    with httpx.Client(base_url=base_url, timeout=300) as http:
        http.post("/v1/chat/completions", json={**body, "max_tokens": 8})  # warm-up
        for _ in range(runs):
            started = time.perf_counter()
            usage = http.post("/v1/chat/completions", json=body).json()["usage"]
            speeds.append(usage["completion_tokens"] / (time.perf_counter() - started))
    return round(sorted(speeds)[len(speeds) // 2], 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--skip-first-run",
        action="store_true",
        help="reuse ~/.cache/ragtune instead of converting into a fresh home",
    )
    parser.add_argument("--restarts", type=int, default=1, help="warm restarts (median)")
    args = parser.parse_args()
    result: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as scratch:
        scratch_dir = Path(scratch)
        home = scratch_dir / "home" if not args.skip_first_run else Path.home() / ".cache/ragtune"
        if not args.skip_first_run:
            seconds, server = time_to_ready(home, scratch_dir / "first.log")
            result["first_run_ready_s"] = round(seconds, 1)
            server.stop()
        restarts = []
        for _ in range(args.restarts - 1):
            seconds, server = time_to_ready(home, scratch_dir / "warm.log")
            restarts.append(round(seconds, 1))
            server.stop()
        seconds, server = time_to_ready(home, scratch_dir / "warm.log")
        restarts.append(round(seconds, 1))
        result["warm_restart_ready_s"] = sorted(restarts)[len(restarts) // 2]
        result["warm_restarts_s"] = restarts
        result["rss_at_ready_mib"] = round(
            psutil.Process(server.process.pid).memory_info().rss / 2**20
        )
        try:
            result["single_request_tok_per_s"] = single_request_speed(server.base_url)
            rss = psutil.Process(server.process.pid).memory_info().rss
            result["server_rss_mib"] = round(rss / 2**20)
        finally:
            server.stop()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
