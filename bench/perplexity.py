"""Perplexity of the served weights: teacher-forced, one token per decode step through the
engine's own forward (so `engine.weights` int4/int8/dense is what gets measured), on the
first --tokens tokens of the demo manuals shipped in data/demo/docs (fixed text, unlike the
project's own docs). Prints one JSON line per configuration.

    python bench/perplexity.py --quantization nf4,none --weights int4,int8,dense
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from ragtune.config import EngineConfig, ModelConfig, default_home
from ragtune.models import load_base_model
from server.engine.runner import CompactRunner
from server.engine.sequence import Sequence
from server.engine.types import GenerationRequest, SamplingParams

ROOT = Path(__file__).resolve().parent.parent


def doc_tokens(tokenizer, count: int) -> list[int]:
    text = "\n\n".join(p.read_text() for p in sorted((ROOT / "data/demo/docs").glob("*")))
    return tokenizer(text)["input_ids"][:count]


def perplexity(runner: CompactRunner, tokenizer, tokens: list[int]) -> float:
    params = SamplingParams(len(tokens), 0.0)
    seq = Sequence(GenerationRequest("ppl", tokens[:1], params, None), tokenizer, set(), print)
    runner.add(seq)
    logits = runner.prefill([seq])[0]
    nll = 0.0
    for target in tokens[1:]:
        nll -= torch.log_softmax(logits.float(), -1)[target].item()
        seq.output_ids.append(target)
        logits = runner.decode([seq])[0]
    runner.release(seq)
    return math.exp(nll / (len(tokens) - 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="bundled", help="model.source (bundled:gemma-3-270m)")
    parser.add_argument("--quantization", default="nf4,int8,none")
    parser.add_argument("--weights", default="int4,int8,dense")
    parser.add_argument("--tokens", type=int, default=1000)
    args = parser.parse_args()
    for quantization in args.quantization.split(","):
        model = ModelConfig(source=args.model, quantization=quantization)
        loaded = load_base_model(model, default_home())
        tokens = doc_tokens(loaded.tokenizer, args.tokens)
        for weights in args.weights.split(","):
            runner = CompactRunner(loaded, EngineConfig(max_batch_size=1, weights=weights), 2048)
            value = perplexity(runner, loaded.tokenizer, tokens)
            row = {"model": args.model, "quantization": quantization, "weights": weights}
            row["tokens"] = len(tokens)
            print(json.dumps({**row, "perplexity": round(value, 2)}), flush=True)


if __name__ == "__main__":
    main()
