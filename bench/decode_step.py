"""Time one decode step of the compact forward alone (no HTTP, no sampling) at several batch
sizes, for each `engine.weights` kind. Prints one JSON line per kind.

    python bench/decode_step.py --weights int4,int8,dense --rows 1,4,16
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ragtune.config import EngineConfig, ModelConfig, default_home
from ragtune.models import load_base_model
from server.engine.runner import CompactRunner
from server.engine.sequence import Sequence
from server.engine.types import GenerationRequest, SamplingParams


def step_ms(runner: CompactRunner, tokenizer, rows: int, steps: int) -> float:
    """Mean decode step over `steps` steps after `rows` prompts of 30-45 tokens."""
    seqs = []
    for i in range(rows):
        prompt = list(range(100, 130 + i))
        request = GenerationRequest(f"r{i}", prompt, SamplingParams(steps + 8, 0.0), None)
        seq = Sequence(request, tokenizer, set(), lambda _: None)
        runner.add(seq)
        seqs.append(seq)
    for seq in seqs:
        seq.output_ids.append(int(runner.prefill([seq])[0].argmax()))

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
    parser.add_argument("--quantization", default="int8")
    parser.add_argument("--weights", default="int4,int8,dense")
    parser.add_argument("--rows", default="1,4,16")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    loaded = load_base_model(ModelConfig(quantization=args.quantization), default_home())
    rows = [int(r) for r in args.rows.split(",")]
    for weights in args.weights.split(","):
        config = EngineConfig(max_batch_size=max(rows), weights=weights)
        runner = CompactRunner(loaded, config, max_seq_len=2048)
        with torch.inference_mode():
            times = {r: round(step_ms(runner, loaded.tokenizer, r, args.steps), 2) for r in rows}
        print(json.dumps({"quantization": args.quantization, "weights": weights, "ms": times}))


if __name__ == "__main__":
    main()
