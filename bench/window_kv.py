"""K/V memory of sliding-window layers: `engine.sliding_window_kv: ring` against `full` on one
model, in one process: long distinct prompts (longer than the ring) prefilled together, then
greedy decode steps; the K/V cache's allocated bytes after the run, the seconds, and whether
both layouts chose the same tokens. Prints one JSON line per layout.

    python bench/window_kv.py                                # Gemma 3 270M, 4 x 3,000 tokens
    python bench/window_kv.py --model bundled:gemma-3-270m --prompts 8 --tokens 4000
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ragtune.config import EngineConfig, ModelConfig, default_home
from ragtune.models import load_base_model
from server.engine.runner import CompactRunner
from server.engine.sequence import Sequence
from server.engine.types import GenerationRequest, SamplingParams

DOCS = Path(__file__).resolve().parents[1] / "data" / "demo" / "docs"


def prompts(tokenizer, count: int, length: int) -> list[list[int]]:
    """`count` distinct prompts of `length` tokens: the demo documents, rotated."""
    text = "\n\n".join(path.read_text(encoding="utf-8") for path in sorted(DOCS.glob("*.md")))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    out = []
    for index in range(count):
        start = (index * 97) % len(ids)
        rotated = ids[start:] + ids[:start]
        out.append((rotated * (length // len(rotated) + 1))[:length])
    return out


def kv_bytes(runner: CompactRunner) -> int:
    cache = runner.cache
    return sum(t.numel() * t.element_size() for t in [*cache.keys_t, *cache.values])


def run(runner: CompactRunner, tokenizer, batch: list[list[int]], steps: int) -> dict:
    seqs = []
    for index, prompt in enumerate(batch):
        request = GenerationRequest(f"r{index}", prompt, SamplingParams(steps + 1, 0.0), None)
        seqs.append(Sequence(request, tokenizer, set(), lambda _: None))
    started = time.perf_counter()
    for seq in seqs:
        runner.add(seq)
    tokens: list[list[int]] = [[] for _ in seqs]
    pending = list(range(len(seqs)))
    while pending:
        logits = runner.prefill([seqs[i] for i in pending])
        for i, row in zip(list(pending), logits, strict=True):
            if row is not None:
                tokens[i].append(int(row.argmax()))
                seqs[i].output_ids.append(tokens[i][-1])
                pending.remove(i)
    prefill_s = time.perf_counter() - started
    for _ in range(steps):
        for i, row in enumerate(runner.decode(seqs)):
            tokens[i].append(int(row.argmax()))
            seqs[i].output_ids.append(tokens[i][-1])
    held = kv_bytes(runner)
    for seq in reversed(seqs):
        runner.release(seq)
    return {
        "prefill_s": round(prefill_s, 2),
        "total_s": round(time.perf_counter() - started, 2),
        "kv_mib": round(held / 2**20, 1),
        "tokens": tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="bundled:gemma-3-270m")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=3000)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--max-seq-len", type=int, default=4096)
    args = parser.parse_args()
    loaded = load_base_model(ModelConfig(source=args.model), default_home())
    batch = prompts(loaded.tokenizer, args.prompts, args.tokens)
    results = {}
    for layout in ("full", "ring"):
        config = EngineConfig(sliding_window_kv=layout, max_batch_size=max(args.prompts, 1))
        runner = CompactRunner(loaded, config, max_seq_len=args.max_seq_len)
        result = run(runner, loaded.tokenizer, batch, args.steps)
        results[layout] = result
        line = {k: v for k, v in result.items() if k != "tokens"}
        line.update(
            layout=layout,
            window_kv=runner.kernels()["window_kv"],
            kv_capacity_mib=round(runner.cache.nbytes / 2**20, 1),
            model=args.model,
            prompts=args.prompts,
            prompt_tokens=args.tokens,
            steps=args.steps,
            torch_threads=torch.get_num_threads(),
        )
        if layout == "ring":
            same = [
                a == b for a, b in zip(results["full"]["tokens"], result["tokens"], strict=True)
            ]
            line["same_tokens_as_full"] = f"{sum(same)}/{len(same)}"
        print(json.dumps(line), flush=True)
        del runner


if __name__ == "__main__":
    main()
