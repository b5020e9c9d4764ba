"""Time the start-up probe of the team's exact sizes (server/engine/team_exactness.py) on the
model the server would load, built as the server builds it under `model.threads: auto`. Prints
one JSON line: the fewest threads it allows, why not fewer, its whole time at start-up (cold,
as the engine runs it), and one probe's time at each team size afterwards (warm, the median of
--repeats).

    python bench/team_probe.py                                   # the bundled SmolLM2
    RAGTUNE_MODEL__SOURCE=bundled:gemma-3-270m python bench/team_probe.py
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
        python bench/team_probe.py                               # the AVX2 kind, emulated

Settings come from the environment and configs as for `ragtune serve`. Measure on a quiet
machine only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from ragtune.config import load_settings
from ragtune.cpu_share import gemms_exact_at_any_thread_count
from server.engine.loading import load_for_engine
from server.engine.runner import build_runner
from server.engine.team_exactness import PROBE_BUDGET_S, fewest_exact_threads, probe_outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=float, default=PROBE_BUDGET_S, help="seconds")
    args = parser.parse_args()
    gemms_exact_at_any_thread_count()  # as `model.threads: auto` does, before the first GEMM
    settings = load_settings()
    loaded, max_seq_len = load_for_engine(settings)
    runner = build_runner(loaded, settings.engine, max_seq_len, team_may_shrink=True)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    fewest, reason = fewest_exact_threads(
        runner, loaded.tokenizer, args.threads, budget_s=args.budget
    )
    whole = time.perf_counter() - started
    per_size = {}
    for threads in range(args.threads, 0, -1):
        torch.set_num_threads(threads)
        times = []
        for _ in range(args.repeats):
            began = time.perf_counter()
            probe_outputs(runner, loaded.tokenizer)
            times.append(time.perf_counter() - began)
        per_size[threads] = round(statistics.median(times), 3)
    print(
        json.dumps(
            {
                "model": settings.model.source,
                "threads": args.threads,
                "fewest": fewest,
                "why": reason,
                "probe_s": round(whole, 2),
                "one_probe_s_by_threads": per_size,
                "prompt_gemm": runner.kernels().get("prompt_gemm"),
            }
        )
    )


if __name__ == "__main__":
    main()
