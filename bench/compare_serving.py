"""Serve the bundled model with ragtune and its peers, one at a time, and run the same
closed-loop load (bench/serve_load.py) against each; prints JSON lines and a markdown table.

    python bench/compare_serving.py --systems ragtune,transformers,transformers-cb,llama-cpp \\
        --llama-cpp-python /path/to/venv/bin/python

Single-stream speed alone, ragtune and llama-cpp-python alternating for N rounds:

    python bench/compare_serving.py --interleave 5 --llama-cpp-python /path/to/venv/bin/python

llama.cpp's own server, 16 parallel slots, with the same 4 adapters converted to GGUF, and
long-prompt prefill (bench/prefill.py) against both:

    python bench/compare_serving.py --systems ragtune,llama-server --prefill \
        --llama-server ~/.cache/llama-server-build/src/llama.cpp/build/bin/llama-server

Peers: `transformers serve` (with and without --continuous-batching) on the converted
safetensors directory, llama-cpp-python's OpenAI server on the same GGUF file (built once
with `pip install 'llama-cpp-python[server]'` in a separate virtualenv), and llama.cpp's
`llama-server` (built once, outside the repo, by shared/tools/build_llama_server.sh; adapters
converted with the `convert_lora_to_gguf.py` of the same source tree, chosen per request with
`"lora": [{"id": i, "scale": 1}]`). llama-server runs twice: without adapters for the base
model's loads and the long prompts, with them for the adapter loads (adapters loaded at scale
0 slow its base requests by half and more).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from ragtune.config import bundled_model_name, default_home
from ragtune.launcher import free_port, start_server
from ragtune.models import resolve_model_dir
from ragtune.models.bundled import bundled_llm_gguf
from ragtune.random_adapter import ALL_PROJECTIONS, make_adapter

LOAD = Path(__file__).with_name("serve_load.py")
PREFILL = Path(__file__).with_name("prefill.py")
BASE = "smollm2-135m-instruct"  # the served id of MODEL (main() sets both from --model)
MODEL = "bundled"
REQUESTS = {1: 6, 4: 12, 16: 32}


def run_load(
    url: str,
    concurrency: int,
    models: str,
    label: str,
    max_tokens: int,
    lora_ids: list[int] | None = None,
) -> dict:
    command = [
        sys.executable,
        str(LOAD),
        "--url",
        url,
        "--concurrency",
        str(concurrency),
        "--requests",
        str(REQUESTS.get(concurrency, concurrency * 3)),
        "--max-tokens",
        str(max_tokens),
        "--models",
        models,
        "--label",
        label,
    ]
    if lora_ids:
        command += ["--lora-ids", ",".join(map(str, lora_ids))]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    result = json.loads(output.strip().splitlines()[-1])
    print(json.dumps(result), flush=True)
    return result


def prefill_module():
    """bench/prefill.py as a module (bench/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_prefill", PREFILL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_prefill(url: str, label: str) -> list[dict]:
    """bench/prefill.py's levels (256/1024/1536 tokens, c=1 and c=4) against one server."""
    command = [sys.executable, str(PREFILL), "--url", url, "--label", label]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    results = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    for result in results:
        print(json.dumps(result), flush=True)
    return results


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}")
        try:
            # Any HTTP answer means the server is up: `transformers serve` answers /v1/models
            # with a 500 offline (it scans the hub cache); models load on the first request,
            # which serve_load's warm-up makes before timing.
            httpx.get(f"{url}/models", timeout=2)
            return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} not ready after {timeout}s")


def peer(command: list[str], url: str, log: Path) -> subprocess.Popen:
    with open(log, "w") as log_file:  # the child keeps its own descriptor
        process = subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
    wait_ready(url, process)
    return process


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


def make_adapters(scratch: Path) -> list[Path]:
    """The 4 rank-16 adapters (every projection) both ragtune and llama-server serve."""
    paths = [scratch / "adapters" / f"lora{i}" for i in range(4)]
    for i, path in enumerate(paths):
        if not path.is_dir():
            make_adapter(path, 16, ALL_PROJECTIONS, seed=i, scale=0.05, source=MODEL)
    return paths


def bench_ragtune(scratch: Path, args: argparse.Namespace) -> list[dict]:
    paths = make_adapters(scratch)
    adapters, names = paths[0].parent, [path.name for path in paths]
    env = {
        "RAGTUNE_ADAPTERS__ROOTS": json.dumps([str(adapters)]),
        "RAGTUNE_SERVER__LOG_LEVEL": "warning",
        "RAGTUNE_MODEL__SOURCE": MODEL,
    }
    if args.quantization:
        env["RAGTUNE_MODEL__QUANTIZATION"] = args.quantization
    if args.weights:
        env["RAGTUNE_ENGINE__WEIGHTS"] = args.weights
    flags = [arg for name in names for arg in ("--adapter", f"{name}={adapters / name}")]
    server = start_server(env, scratch / "ragtune.log", flags)
    results = []
    try:
        print(json.dumps({"ragtune_engine": engine_info(server.base_url)}), flush=True)
        if args.prefill:
            results += run_prefill(server.v1, "ragtune")
        for c in args.concurrency:
            results.append(run_load(server.v1, c, BASE, f"ragtune base c={c}", args.max_tokens))
            results.append(
                run_load(server.v1, c, names[0], f"ragtune 1 adapter c={c}", args.max_tokens)
            )
            results.append(
                run_load(
                    server.v1, c, ",".join(names), f"ragtune 4 adapters c={c}", args.max_tokens
                )
            )
    finally:
        server.stop()
    return results


def bench_transformers(scratch: Path, args: argparse.Namespace, continuous: bool) -> list[dict]:
    model_dir = resolve_model_dir("bundled", default_home())
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    command = [
        str(Path(sys.executable).with_name("transformers")),
        "serve",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
    ]
    if continuous:
        command.append("--continuous-batching")
    label = "transformers serve" + (" --continuous-batching" if continuous else "")
    process = peer(command, url, scratch / "transformers.log")
    try:
        return [
            run_load(url, c, str(model_dir), f"{label} c={c}", args.max_tokens)
            for c in args.concurrency
        ]
    finally:
        stop(process)


def start_llama_cpp(python: str, scratch: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    command = [
        python,
        "-m",
        "llama_cpp.server",
        "--model",
        str(bundled_llm_gguf()),
        "--n_threads",
        "2",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        "2048",
        # its default cuts off a running stream whenever another request arrives; queue them
        "--interrupt_requests",
        "False",
    ]
    return peer(command, url, scratch / "llama_cpp.log"), url


def bench_llama_cpp(scratch: Path, args: argparse.Namespace) -> list[dict]:
    process, url = start_llama_cpp(args.llama_cpp_python, scratch)
    try:
        return [
            run_load(url, c, BASE, f"llama-cpp-python c={c}", args.max_tokens)
            for c in args.concurrency
        ]
    finally:
        stop(process)


def engine_info(url: str) -> dict:
    """The CPU kind and kernels the server chose (its ragtune_engine_info metric)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    line = next((ln for ln in text.splitlines() if ln.startswith("ragtune_engine_info{")), "")
    return dict(re.findall(r'(\w+)="([^"]*)"', line))


def llama_cpp_source(binary: Path) -> Path:
    """The llama.cpp tree a llama-server binary was built in (build/bin/llama-server)."""
    return binary.resolve().parent.parent.parent


def convert_adapters(binary: Path, adapters: list[Path], out: Path) -> list[Path]:
    """PEFT adapters -> GGUF LoRA files, with the converter of the binary's source tree."""
    source = llama_cpp_source(binary)
    base = resolve_model_dir(MODEL, default_home())
    out.mkdir(parents=True, exist_ok=True)
    converted = []
    for adapter in adapters:
        target = out / f"{adapter.name}.gguf"
        command = [
            sys.executable,
            str(source / "convert_lora_to_gguf.py"),
            "--base",
            str(base),
            "--outfile",
            str(target),
            str(adapter),
        ]
        env = {**os.environ, "PYTHONPATH": str(source / "gguf-py")}
        subprocess.run(command, check=True, capture_output=True, env=env)
        converted.append(target)
    return converted


def bench_llama_server(scratch: Path, args: argparse.Namespace) -> list[dict]:
    """llama.cpp's server, 16 slots x 2048 tokens, 2 threads, twice: without adapters for the
    base model's loads and the long prompts, then with the 4 adapters loaded at scale 0 and
    chosen per request. One instance for both would slow its base figures: with adapters
    loaded, base requests ran at less than half the speed (SmolLM2 c=1 58 vs 150 tok/s on an
    AVX-512 EPYC, 2026-12-06), which is not what a user serving only the base model sees."""
    results = []
    with llama_server(scratch, args, []) as url:
        if args.prefill:
            results += run_prefill(url, "llama-server")
        for c in args.concurrency:
            results.append(run_load(url, c, BASE, f"llama-server base c={c}", args.max_tokens))
    adapters = make_adapters(scratch)
    loras = convert_adapters(Path(args.llama_server), adapters, scratch / "gguf-adapters")
    with llama_server(scratch, args, loras) as url:
        for c in args.concurrency:
            results.append(
                run_load(url, c, BASE, f"llama-server 1 adapter c={c}", args.max_tokens, [0])
            )
            results.append(
                run_load(
                    url, c, BASE, f"llama-server 4 adapters c={c}", args.max_tokens, [0, 1, 2, 3]
                )
            )
    return results


@contextlib.contextmanager
def llama_server(scratch: Path, args: argparse.Namespace, loras: list[Path]) -> Iterator[str]:
    """A llama-server on a free port with these adapters loaded at scale 0; yields its URL."""
    port = free_port()
    gguf = bundled_llm_gguf(bundled_model_name(MODEL))
    command = [str(args.llama_server), "-m", str(gguf), "-np", "16", "-c", "32768"]
    command += ["-t", "2", "--host", "127.0.0.1", "--port", str(port)]
    for lora in loras:
        command += ["--lora", str(lora)]
    if loras:
        command.append("--lora-init-without-apply")
    log = scratch / f"llama_server_{len(loras)}_adapters.log"
    process = peer(command, f"http://127.0.0.1:{port}/v1", log)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", process)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop(process)


def wait_healthy(base_url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    """llama-server answers 503 while it loads the model; /health is 200 once it can serve.
    A binary built for instructions the CPU lacks dies here (e.g. a native build's AMX
    tiles: SIGILL), which is said as such rather than as a refused connection."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"{process.args[0]} exited with {process.returncode} while loading "
                "(-4: illegal instruction; see bench/README.md for a build without AMX)"
            )
        try:
            if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{base_url} not healthy after {timeout}s")


def bench_single_stream(scratch: Path, args: argparse.Namespace) -> list[dict]:
    """c=1 only, ragtune (base model) and llama-cpp-python both up, alternating for
    `--interleave` rounds: single-stream speed drifts between runs on a shared VM, and
    alternating shows whether a gap is the system or the moment."""
    env = {"RAGTUNE_SERVER__LOG_LEVEL": "warning"}
    if args.quantization:
        env["RAGTUNE_MODEL__QUANTIZATION"] = args.quantization
    server = start_server(env, scratch / "ragtune.log")
    llama, url = start_llama_cpp(args.llama_cpp_python, scratch)
    results = []
    try:
        for round_ in range(1, args.interleave + 1):
            results.append(run_load(server.v1, 1, BASE, f"ragtune c=1 #{round_}", args.max_tokens))
            results.append(
                run_load(url, 1, BASE, f"llama-cpp-python c=1 #{round_}", args.max_tokens)
            )
    finally:
        stop(llama)
        server.stop()
    return results


def table(results: list[dict]) -> str:
    prefill = [r for r in results if "target_tokens" in r]
    results = [r for r in results if "target_tokens" not in r]
    lines = [prefill_module().table(prefill), ""] if prefill else []
    lines += [
        "| run | tok/s | req/s | p50 latency s | p95 latency s | TTFT p50 s | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['label']} | {r['tok_per_s']} | {r['req_per_s']} | "
            f"{r['latency_p50_s']} | {r['latency_p95_s']} | {r['ttft_p50_s']} | "
            f"{r['errors']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--systems", default="ragtune,transformers,transformers-cb")
    parser.add_argument(
        "--concurrency", type=lambda s: [int(c) for c in s.split(",")], default=[1, 4, 16]
    )
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument(
        "--quantization", default=None, help="model.quantization (default: the server's)"
    )
    parser.add_argument(
        "--weights", default=None, help="ragtune's engine.weights (default: the server's auto)"
    )
    parser.add_argument(
        "--llama-cpp-python",
        default=None,
        help="python of a virtualenv with llama-cpp-python[server]",
    )
    parser.add_argument(
        "--interleave",
        type=int,
        default=0,
        help="instead: c=1 only, ragtune and llama-cpp-python alternating this many rounds",
    )
    parser.add_argument("--llama-server", default=None, help="llama.cpp's llama-server binary")
    parser.add_argument(
        "--prefill",
        action="store_true",
        help="also long-prompt TTFT and prefill tok/s (bench/prefill.py) for ragtune and "
        "llama-server",
    )
    parser.add_argument(
        "--model",
        default="bundled",
        help="the bundled model both serve: bundled (SmolLM2) or bundled:gemma-3-270m",
    )
    args = parser.parse_args()
    global BASE, MODEL
    MODEL, BASE = args.model, bundled_model_name(args.model)
    from ragtune.hardware import detect

    print(json.dumps({"machine": detect().describe()}), flush=True)
    results: list[dict] = []
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        if args.interleave and args.llama_cpp_python:
            results += bench_single_stream(scratch, args)
        for system in [] if args.interleave else args.systems.split(","):
            if system == "ragtune":
                results += bench_ragtune(scratch, args)
            elif system in ("transformers", "transformers-cb"):
                results += bench_transformers(scratch, args, system == "transformers-cb")
            elif system == "llama-cpp" and args.llama_cpp_python:
                results += bench_llama_cpp(scratch, args)
            elif system == "llama-server" and args.llama_server:
                results += bench_llama_server(scratch, args)
    print(table(results))


if __name__ == "__main__":
    main()
