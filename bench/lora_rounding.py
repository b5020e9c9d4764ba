"""What the int8 LoRA factors of decode (server/engine/lora_rowwise.py) cost in accuracy:
greedy tokens of the int4 base + float LoRA path, teacher-forced through int4 + int8
rowwise LoRA and, for scale, through dense weights + float LoRA; per decode step the KL
divergence from the first path and whether the top token agrees. One JSON line per adapter.

    python bench/lora_rounding.py out/demo/work/adapters/demo-knowledge/<version> ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ragtune.config import EngineConfig, ModelConfig, default_home
from ragtune.models import load_base_model
from server.adapters.loader import BaseSpec, read_adapter
from server.engine.runner import CompactRunner
from server.engine.sequence import Sequence
from server.engine.types import GenerationRequest, SamplingParams

PROMPTS = [
    "What is the policy for reporting a lost badge at the warehouse?",
    "Does aspirin reduce the risk of heart attack?",
    "Explain how to reset the Keystone app.",
    "Which team owns the Osaka depot?",
    "Summarise the safety rules for forklift drivers.",
    "Is vitamin D linked to bone density in older women?",
]


def step_logits(runner: CompactRunner, tokenizer, ids, adapter, steps, forced=None):
    """[steps + 1, vocab] logits: the prompt's last row, then each decode step's, feeding
    `forced` tokens (or its own greedy ones); returns (tokens fed, logits)."""
    request = GenerationRequest("probe", ids, SamplingParams(steps + 1, 0.0), adapter)
    seq = Sequence(request, tokenizer, set(), lambda _: None)
    runner.add(seq)
    out = None
    while out is None:
        out = runner.prefill([seq])[0]
    rows, fed = [out.float()], list(forced or [])
    for step in range(steps):
        if forced is None:
            fed.append(int(rows[-1].argmax()))
        seq.output_ids.append(fed[step])
        rows.append(runner.decode([seq]).float()[0])
    runner.release(seq)
    return fed, torch.stack(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("adapters", nargs="+", type=Path)
    parser.add_argument("--steps", type=int, default=47)
    args = parser.parse_args()
    loaded = load_base_model(ModelConfig(), default_home())

    def runner(weights: str, rowwise: bool) -> CompactRunner:
        config = EngineConfig(max_batch_size=16, max_lora_rank=64, weights=weights)
        made = CompactRunner(loaded, config, max_seq_len=1024)
        made.lora.rowwise_decode = rowwise
        return made

    reference = runner("int4", False)
    others = {
        "int4 + int8 rowwise LoRA": runner("int4", True),
        "dense + float LoRA": runner("dense", False),
    }
    m = reference.model
    spec = BaseSpec(loaded.fingerprint, m.num_layers, reference.module_shapes, 64, m.dtype)
    for path in args.adapters:
        adapter = read_adapter(path, path.parent.name, None, spec, 0).weights
        found: dict[str, list[tuple[float, float, float]]] = {name: [] for name in others}
        for prompt in PROMPTS:
            messages = [{"role": "user", "content": prompt}]
            text = loaded.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
            ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
            with torch.inference_mode():
                fed, ref = step_logits(reference, loaded.tokenizer, ids, adapter, args.steps)
                for name, other in others.items():
                    _, got = step_logits(other, loaded.tokenizer, ids, adapter, args.steps, fed)
                    p, q = torch.log_softmax(ref[1:], -1), torch.log_softmax(got[1:], -1)
                    kl = (p.exp() * (p - q)).sum(-1)
                    same = (ref[1:].argmax(-1) == got[1:].argmax(-1)).float().mean()
                    found[name].append((kl.mean().item(), kl.max().item(), same.item()))
        summary = {
            name: {
                "mean_kl": round(sum(v[0] for v in values) / len(values), 5),
                "max_kl": round(max(v[1] for v in values), 4),
                "top1_agree": round(sum(v[2] for v in values) / len(values), 3),
            }
            for name, values in found.items()
        }
        print(json.dumps({"adapter": str(path), "against": "int4 + float LoRA", **summary}))


if __name__ == "__main__":
    main()
