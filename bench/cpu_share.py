"""One server beside a CPU hog, before and after `model.threads: auto` (issue #18).

Cases, each a fresh `ragtune serve` driven by bench/serve_load.py (streamed, c=4):
  alone        no hog, threads auto (every core here)
  alone-fixed  no hog, threads = every core as a number (a team that never shrinks)
  hog-all      a busy-looping process beside it, threads = every core (torch's default)
  hog-auto     the same hog; the server given one core (an affinity mask, as `taskset -c 1`, a
               container quota or a Ray `num_cpus: 1` would) and threads auto, which reads
               that share -> 1 thread
  hog-shrink   the same hog, no mask, threads auto: every core at start, and the team shrinks
               once its threads wait for cores (server/engine/team_size.py)
  hog-one      the same hog, threads 1 without a mask

    python bench/cpu_share.py --requests 24 --max-tokens 64
    python bench/cpu_share.py --cases alone,alone-fixed,hog-all,hog-shrink --concurrency 16

Prints one JSON line per case. Run it on a quiet machine: another CPU-heavy process skews
every number (check `uptime` first).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ragtune.launcher import start_server  # noqa: E402

HOG = "while True: pass"


def run_case(label: str, threads: str, hog: bool, pin: int | None, args) -> dict:
    env = {"RAGTUNE_MODEL__THREADS": threads, "RAGTUNE_SERVER__LOG_LEVEL": "info"}
    hog_process = subprocess.Popen([sys.executable, "-c", HOG]) if hog else None
    log = Path(tempfile.mkdtemp()) / f"{label}.log"
    mask = os.sched_getaffinity(0)
    if pin is not None:  # the server inherits this mask (as `taskset -c` would give it)
        os.sched_setaffinity(0, {pin})
    try:
        server = start_server(env, log)
    finally:
        os.sched_setaffinity(0, mask)
    try:
        out = subprocess.run(
            [
                sys.executable,
                str(ROOT / "bench" / "serve_load.py"),
                "--url",
                server.v1,
                "--concurrency",
                str(args.concurrency),
                "--requests",
                str(args.requests),
                "--max-tokens",
                str(args.max_tokens),
                "--label",
                label,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        result = json.loads(out.stdout.strip().splitlines()[-1])
        threads_line = next((ln for ln in server.log().splitlines() if "threads:" in ln), "")
        result["threads_log"] = threads_line.split("threads:", 1)[-1].strip()[:120]
        changes = [ln for ln in server.log().splitlines() if "engine threads" in ln]
        result["team_changes"] = len(changes)
        result["team_last"] = changes[-1].split("engine threads", 1)[-1][:100] if changes else ""
        return result
    finally:
        server.stop()
        if hog_process is not None:
            hog_process.kill()
            hog_process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--cases", default="alone,hog-all,hog-auto,hog-one")
    args = parser.parse_args()
    cores = str(os.cpu_count() or 1)
    pin = max(os.sched_getaffinity(0))
    cases = {
        "alone": ("auto", False, None),
        "alone-fixed": (cores, False, None),
        "hog-all": (cores, True, None),
        "hog-auto": ("auto", True, pin),
        "hog-shrink": ("auto", True, None),
        "hog-one": ("1", True, None),
    }
    for label in args.cases.split(","):
        threads, hog, mask = cases[label]
        print(json.dumps(run_case(label, threads, hog, mask, args)), flush=True)


if __name__ == "__main__":
    main()
