"""MKL's strict reproducible mode against its default, on the fp32 path where MKL runs the
prompt GEMMs (CPUs without bf16, the AVX2 kind; emulated on others with --emulate-avx2).

`model.threads: auto` sets `MKL_CBWR=AUTO,STRICT` (ragtune/cpu_share.py) so that a GEMM's
bits do not depend on the thread count, which the team sizer changes (server/engine/
team_size.py). This measures what that costs or gains: fresh servers, strict and default
alternating for --rounds, each driven by bench/prefill.py (distinct ~1,000-token prompts at
c=1 and c=4, then prompts sharing their sources at c=4: the prefix cache) and
bench/serve_load.py (64 tokens, streamed, c=16 and c=1). Each line also gives the engine's
`rows_independent` and `prefix_cache` from /metrics: the start-up checks decide them.

    python bench/mkl_strict.py --emulate-avx2 --rounds 2
    python bench/mkl_strict.py --emulate-avx2 --branch AVX2   # MKL's AVX2 code path too

Prints one JSON line per (round, mode, load). Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ragtune.launcher import start_server  # noqa: E402

EMULATED_AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def bench_lines(script: str, args: list[str]) -> list[dict]:
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def engine_facts(url: str) -> dict[str, str]:
    metrics = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=30).text
    info = next(line for line in metrics.splitlines() if line.startswith("ragtune_engine_info"))
    labels = dict(re.findall(r'(\w+)="([^"]*)"', info))
    return {name: labels.get(name, "?") for name in ("dtype", "rows_independent", "prefix_cache")}


def run_mode(label: str, cbwr: str, args) -> list[dict]:
    env = {"MKL_CBWR": cbwr, "RAGTUNE_MODEL__THREADS": "auto"}
    if args.emulate_avx2:
        env.update(EMULATED_AVX2)
    server = start_server(env, Path(tempfile.mkdtemp()) / f"{label}.log")
    try:
        facts = {"mode": label, "MKL_CBWR": cbwr, **engine_facts(server.v1)}
        url = ["--url", server.v1, "--label", label]
        tokens = ["--tokens", str(args.prompt_tokens)]
        rows = []
        for line in bench_lines("prefill.py", [*url, *tokens, "--concurrency", "1,4"]):
            rows.append({**facts, "load": f"prefill c={line['concurrency']}", **line})
        shared = [*url, *tokens, "--concurrency", "4", "--shared-prefix"]
        for line in bench_lines("prefill.py", shared):
            rows.append({**facts, "load": "prefill c=4 shared sources", **line})
        for concurrency, requests in ((16, 48), (1, 8)):
            load = ["--concurrency", str(concurrency), "--requests", str(requests)]
            for line in bench_lines("serve_load.py", [*url, *load, "--max-tokens", "64"]):
                rows.append({**facts, "load": f"decode c={concurrency}", **line})
        return rows
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--emulate-avx2", action="store_true")
    parser.add_argument("--branch", default="AUTO", help="MKL's code path: AUTO, AVX2, ...")
    parser.add_argument("--prompt-tokens", type=int, default=1000)
    args = parser.parse_args()
    modes = (("strict", f"{args.branch},STRICT"), ("default", args.branch))
    for round_index in range(args.rounds):
        for label, cbwr in modes if round_index % 2 == 0 else modes[::-1]:
            for row in run_mode(label, cbwr, args):
                print(json.dumps({"round": round_index, **row}), flush=True)


if __name__ == "__main__":
    main()
