"""Mixed-adapter decoding in-process: PEFT's mixed-batch forward (`adapter_names`) versus
ragtune's runner (slot KV cache + batched LoRA), same model, adapters, batch and length.
Prints one JSON line.

    python bench/lora_batching.py --batch 16 --adapters 4 --tokens 64
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from ragtune.config import EngineConfig, ModelConfig, default_home
from ragtune.models import load_base_model
from ragtune.models.chat import encode_prompt, render_chat
from ragtune.random_adapter import ALL_PROJECTIONS, make_adapter
from server.adapters.loader import BaseSpec, read_adapter
from server.engine.runner import CompactRunner
from server.engine.sequence import Sequence
from server.engine.types import GenerationRequest, SamplingParams


def make_adapters(count: int, rank: int, folder: Path) -> list[Path]:
    return [
        make_adapter(folder / f"a{i}", rank, ALL_PROJECTIONS, seed=i, scale=0.05)
        for i in range(count)
    ]


def bench_peft(
    model_dir: Path, adapters: list[Path], prompts: list[list[int]], tokens: int, pad_id: int
) -> float:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(base, adapters[0], adapter_name="a0")
    for i, path in enumerate(adapters[1:], start=1):
        model.load_adapter(path, adapter_name=f"a{i}")
    model.eval()
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in prompts])[:, None]
    names = [f"a{i % len(adapters)}" for i in range(len(prompts))]
    kwargs = dict(
        input_ids=ids,
        attention_mask=mask.long(),
        do_sample=False,
        pad_token_id=pad_id,
        eos_token_id=None,
        adapter_names=names,
    )
    with torch.inference_mode():
        model.generate(**kwargs, max_new_tokens=4)
        started = time.perf_counter()
        model.generate(**kwargs, max_new_tokens=tokens, min_new_tokens=tokens)
    return len(prompts) * tokens / (time.perf_counter() - started)


def bench_ragtune(
    adapters: list[Path], prompts: list[list[int]], tokens: int, quantization: str
) -> float:
    loaded = load_base_model(ModelConfig(quantization=quantization, dtype="bf16"), default_home())
    runner = CompactRunner(
        loaded, EngineConfig(max_batch_size=len(prompts), max_loras=len(adapters)), max_seq_len=512
    )
    spec = BaseSpec(
        loaded.fingerprint, runner.model.num_layers, runner.module_shapes, 16, loaded.dtype
    )
    weights = [read_adapter(p, p.name, None, spec, i).weights for i, p in enumerate(adapters)]

    def run(steps: int) -> None:
        seqs = []
        for i, prompt in enumerate(prompts):
            seq = Sequence(
                GenerationRequest(
                    f"r{i}", prompt, SamplingParams(steps + 1, 0.0), weights[i % len(weights)]
                ),
                loaded.tokenizer,
                set(),
                lambda _: None,
            )
            runner.add(seq)
            seqs.append(seq)
        for seq in seqs:
            seq.output_ids.append(int(runner.prefill([seq])[0].argmax()))
        for _ in range(steps):
            for seq, token in zip(seqs, runner.decode(seqs).argmax(-1).tolist(), strict=True):
                seq.output_ids.append(token)
        for seq in seqs:
            runner.release(seq)

    run(4)
    started = time.perf_counter()
    run(tokens)
    return len(prompts) * tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--quantization", default="nf4")
    args = parser.parse_args()
    loaded = load_base_model(ModelConfig(quantization="none"), default_home())
    tokenizer = loaded.tokenizer
    questions = [
        "What is the capital of France?",
        "Write a poem about rain.",
        "Explain gravity.",
        "List five animals that live in the sea.",
    ]
    prompts = [
        encode_prompt(
            tokenizer,
            render_chat(tokenizer, [{"role": "user", "content": questions[i % len(questions)]}]),
        )
        for i in range(args.batch)
    ]
    with tempfile.TemporaryDirectory() as scratch:
        paths = make_adapters(args.adapters, args.rank, Path(scratch))
        peft = bench_peft(loaded.model_dir, paths, prompts, args.tokens, tokenizer.pad_token_id)
        ours = bench_ragtune(paths, prompts, args.tokens, args.quantization)
        ours_one = bench_ragtune(paths[:1], prompts, args.tokens, args.quantization)
    print(
        json.dumps(
            {
                "batch": args.batch,
                "adapters": args.adapters,
                "rank": args.rank,
                "tokens": args.tokens,
                "peft_adapter_names_tok_per_s": round(peft, 1),
                "ragtune_runner_tok_per_s": round(ours, 1),
                "ragtune_runner_one_adapter_tok_per_s": round(ours_one, 1),
                "speedup_vs_peft": round(ours / peft, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
