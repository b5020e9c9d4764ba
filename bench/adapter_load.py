"""Adapter hot-load latency and server memory across load/unload; prints one JSON line.

- hot load: POST /v1/load_lora_adapter of an r=16 adapter on all 7 projections into a running
  server, `--loads` times (unloaded again after each), p50/p95 of the HTTP round trip and of the
  server's own `load_ms`; compared with PEFT's `PeftModel.load_adapter` of the same adapter
  into the same base model in this process (the plain Hugging Face way to add an adapter);
- memory: server RSS (psutil on the server pid) before, after loading `--adapters` distinct
  adapters, after unloading them all, and after a second load/unload cycle (a leak grows).

    nice -n 10 .venv/bin/python bench/adapter_load.py [--loads 20] [--adapters 20]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import torch

from ragtune.config import default_home
from ragtune.launcher import start_server
from ragtune.models import resolve_model_dir
from ragtune.random_adapter import random_peft_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADMIN_KEY = "bench-admin-key"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {
        "p50": round(statistics.median(ordered), 1),
        "p95": round(at(0.95), 1),
        "min": round(ordered[0], 1),
        "max": round(ordered[-1], 1),
    }


def make_adapters(root: Path, count: int, rank: int) -> list[Path]:
    """`count` distinct PEFT adapters (different seeds) saved as safetensors."""
    model = random_peft_model(rank, TARGETS, seed=0)
    paths = []
    for i in range(count):
        torch.manual_seed(1000 + i)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.normal_(0, 0.02)
        path = root / f"bench-{i:02d}"
        model.save_pretrained(path, safe_serialization=True)
        paths.append(path)
    return paths


def peft_load_adapter_ms(path: Path, loads: int) -> list[float]:
    """PEFT's own hot load of the same adapter into the same base model (fp32, CPU)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(
        resolve_model_dir("bundled", default_home()), dtype=torch.float32
    )
    model = PeftModel.from_pretrained(base, path, adapter_name="first")
    times = []
    for i in range(loads + 1):
        started = time.perf_counter()
        model.load_adapter(path, adapter_name=f"hot{i}")
        elapsed = (time.perf_counter() - started) * 1000
        model.delete_adapter(f"hot{i}")
        if i:  # the first is a warm-up, as on the server
            times.append(elapsed)
    return times


def rss_mb(pid: int) -> float:
    return round(psutil.Process(pid).memory_info().rss / 2**20, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loads", type=int, default=20)
    parser.add_argument("--adapters", type=int, default=20)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="ragtune-bench-adapters-") as tmp:
        work = Path(tmp)
        root = work / "adapters"
        paths = make_adapters(root, max(args.adapters, 1), args.rank)
        adapter_mb = (paths[0] / "adapter_model.safetensors").stat().st_size / 2**20
        env = {
            "RAGTUNE_ADMIN_KEYS": ADMIN_KEY,
            "RAGTUNE_ADAPTERS__ROOTS": json.dumps([str(root)]),
            "RAGTUNE_ADAPTERS__MAX_CPU_LORAS": str(args.adapters + 8),
            "RAGTUNE_AUDIT_LOG": str(work / "audit.log"),
            "RAGTUNE_SERVER__LOG_LEVEL": "warning",
        }
        server = start_server(env, work / "server.log", ready_timeout=900)
        try:
            with httpx.Client(base_url=server.base_url, timeout=300) as http:

                def load(name: str, path: Path) -> tuple[float, float]:
                    started = time.perf_counter()
                    response = http.post(
                        "/v1/load_lora_adapter",
                        headers=ADMIN,
                        json={"lora_name": name, "lora_path": str(path)},
                    )
                    elapsed = (time.perf_counter() - started) * 1000
                    response.raise_for_status()
                    return elapsed, response.json()["load_ms"]

                def unload(name: str) -> None:
                    http.post(
                        "/v1/unload_lora_adapter", headers=ADMIN, json={"lora_name": name}
                    ).raise_for_status()

                def chat(model: str) -> None:
                    http.post(
                        "/v1/chat/completions",
                        headers=ADMIN,
                        json={
                            "model": model,
                            "max_tokens": 4,
                            "temperature": 0,
                            "messages": [{"role": "user", "content": "Hello"}],
                        },
                    ).raise_for_status()

                # warm-up: first load, first adapter request (imports, allocator pools)
                load("warmup", paths[0])
                chat("warmup")
                chat("smollm2-135m-instruct")
                unload("warmup")

                http_ms, server_ms = [], []
                for _ in range(args.loads):
                    round_trip, inside = load("hot", paths[0])
                    unload("hot")
                    http_ms.append(round_trip)
                    server_ms.append(inside)

                def cycle() -> tuple[float, float]:
                    for i, path in enumerate(paths[: args.adapters]):
                        load(f"m{i:02d}", path)
                    time.sleep(1)
                    loaded = rss_mb(server.process.pid)
                    for i in range(args.adapters):
                        unload(f"m{i:02d}")
                    time.sleep(1)
                    return loaded, rss_mb(server.process.pid)

                time.sleep(1)
                rss_start = rss_mb(server.process.pid)
                rss_loaded, rss_unloaded = cycle()
                _, rss_second = cycle()  # a leak would grow again here
                chat("smollm2-135m-instruct")  # still serving
        finally:
            server.stop()

        gc.collect()
        peft_ms = peft_load_adapter_ms(paths[0], args.loads)

    print(
        json.dumps(
            {
                "adapter": {
                    "rank": args.rank,
                    "targets": len(TARGETS),
                    "safetensors_mb": round(adapter_mb, 2),
                },
                "hot_load_http_ms": percentiles(http_ms),
                "hot_load_server_ms": percentiles(server_ms),
                "peft_load_adapter_ms": percentiles(peft_ms),
                "rss_mb": {
                    "start": rss_start,
                    f"after_loading_{args.adapters}": rss_loaded,
                    "after_unloading": rss_unloaded,
                    "after_a_second_cycle": rss_second,
                },
                "rss_after_unload_vs_start": round(rss_unloaded / rss_start, 3),
                "cpu_count": psutil.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
