"""Time one decode step of the compact forward alone (no HTTP, no sampling) at several batch
sizes, for each `engine.weights` kind. Prints one JSON line per kind.

    python bench/decode_step.py --weights int4,int8,dense --rows 1,4,16
    python bench/decode_step.py --weights int4 --rows 1,16 --adapters 1   # rows on LoRA slots
    python bench/decode_step.py --weights int4 --rows 1,16 --adapters 1 --sparse  # SHiRA
    python bench/decode_step.py --weights w4a8 --attention kernel,torch --prompt-tokens 500
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ragtune.config import EngineConfig, ModelConfig, default_home
from ragtune.models import load_base_model
from server.engine.lora import AdapterWeights
from server.engine.runner import CompactRunner
from server.engine.sequence import Sequence
from server.engine.sparse import SparseAdapterWeights
from server.engine.types import GenerationRequest, SamplingParams


def random_adapters(
    runner: CompactRunner, count: int, rank: int, sparse: bool
) -> list[AdapterWeights | SparseAdapterWeights]:
    """`count` random rank-`rank` adapters on every projection of the runner's model (sparse:
    SHiRA adapters of the same parameter count, r * (in + out) random entries per matrix)."""
    generator = torch.Generator().manual_seed(0)
    adapters: list[AdapterWeights | SparseAdapterWeights] = []
    for index in range(count):
        if sparse:
            entries = {}
            for layer in range(runner.model.num_layers):
                for module, (fan_in, fan_out) in runner.module_shapes.items():
                    count_ = rank * (fan_in + fan_out)
                    flat = torch.randperm(fan_in * fan_out, generator=generator)[:count_].sort()
                    values = torch.randn(count_, generator=generator) * 0.02
                    entries[(layer, module)] = (flat.values // fan_in, flat.values % fan_in, values)
            adapters.append(SparseAdapterWeights(f"sparse{index}@1", rank, entries))
            continue
        factors = {}
        for layer in range(runner.model.num_layers):
            for module, (fan_in, fan_out) in runner.module_shapes.items():
                a = torch.randn(rank, fan_in, generator=generator) * 0.02
                b = torch.randn(fan_out, rank, generator=generator) * 0.02
                factors[(layer, module)] = (a, b)
        adapters.append(AdapterWeights(f"random{index}@1", rank, factors))
    return adapters


def step_ms(
    runner: CompactRunner,
    tokenizer,
    rows: int,
    steps: int,
    adapters: list[AdapterWeights | SparseAdapterWeights],
    prompt_tokens: int = 30,
) -> float:
    """Mean decode step over `steps` steps after `rows` prompts of prompt_tokens + 0..rows-1
    tokens (round-robin over `adapters` when there are any)."""
    seqs = []
    for i in range(rows):
        prompt = [100 + t % 1000 for t in range(prompt_tokens + i)]
        adapter = adapters[i % len(adapters)] if adapters else None
        request = GenerationRequest(f"r{i}", prompt, SamplingParams(steps + 8, 0.0), adapter)
        seq = Sequence(request, tokenizer, set(), lambda _: None)
        runner.add(seq)
        seqs.append(seq)
    for seq in seqs:
        while (logits := runner.prefill([seq])[0]) is None:  # a prompt longer than a chunk
            pass
        seq.output_ids.append(int(logits.argmax()))

    def advance() -> None:
        tokens = runner.decode(seqs).argmax(-1).tolist()
        for seq, token in zip(seqs, tokens, strict=True):
            seq.output_ids.append(token)

    for _ in range(5):
        advance()
    started = time.perf_counter()
    for _ in range(steps):
        advance()
    elapsed = time.perf_counter() - started
    for seq in seqs:
        runner.release(seq)
    return elapsed / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="bundled", help="model.source (bundled:gemma-3-270m)")
    parser.add_argument("--quantization", default="int8")
    parser.add_argument("--weights", default="int4,int8,dense")
    parser.add_argument("--rows", default="1,4,16")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--adapters", type=int, default=0, help="rows round-robin over N LoRAs")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--sparse", action="store_true", help="SHiRA adapters, LoRA's size")
    parser.add_argument("--attention", default="auto", help="engine.decode_attention kinds")
    parser.add_argument("--prompt-tokens", type=int, default=30)
    parser.add_argument(
        "--decode-layers", default="auto", help="engine.decode_layers kinds (auto,python)"
    )
    parser.add_argument("--profile", action="store_true", help="torch profiler table, last kind")
    args = parser.parse_args()
    model = ModelConfig(source=args.model, quantization=args.quantization)
    loaded = load_base_model(model, default_home())
    rows = [int(r) for r in args.rows.split(",")]
    kinds = [
        (w, a, layers)
        for w in args.weights.split(",")
        for a in args.attention.split(",")
        for layers in args.decode_layers.split(",")
    ]
    for weights, attention, layers in kinds:
        config = EngineConfig(
            max_batch_size=max(rows),
            weights=weights,
            decode_attention=attention,
            decode_layers=layers,
        )
        runner = CompactRunner(loaded, config, max_seq_len=2048)
        adapters = random_adapters(runner, args.adapters, args.rank, args.sparse)
        with torch.inference_mode():
            times = {
                r: round(
                    step_ms(runner, loaded.tokenizer, r, args.steps, adapters, args.prompt_tokens),
                    2,
                )
                for r in rows
            }
            if args.profile:
                with torch.profiler.profile() as profiler:
                    step_ms(runner, loaded.tokenizer, rows[-1], 10, adapters)
                print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        print(
            json.dumps(
                {
                    "model": args.model,
                    "quantization": args.quantization,
                    "weights": weights,
                    "attention": attention,
                    "decode_layers": runner.kernels()["decode_layers"],
                    "prompt_tokens": args.prompt_tokens,
                    "adapters": args.adapters,
                    "kind": "sparse" if args.sparse else "lora",
                    "adapter_mib": round(sum(a.nbytes for a in adapters) / 2**20, 1),
                    "slot_mib": round(runner.lora.nbytes / 2**20, 1),
                    "ms": times,
                }
            )
        )


if __name__ == "__main__":
    main()
