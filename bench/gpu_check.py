"""The CUDA path on a random-weight ~1B Llama (TinyLlama-1.1B's shape: GPU machines here
cannot download models), bf16 and int4: decode steps replayed from CUDA graphs against eager
ones, alone-vs-batched greedy tokens with mixed adapters, weight memory, prompts prefilled one
at a time against together, and Hugging Face's `generate` (dynamic cache; static cache with
its automatic `torch.compile`) on the same model at the same batch sizes. One JSON line per
measurement, also appended to --out.

    python bench/gpu_check.py --rows 1,16,64,128 --steps 40 --out gpu_check.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_step import step_ms

from ragtune.config import EngineConfig
from ragtune.models.loader import LoadedModel
from server.engine.lora import LLAMA_GROUPS, AdapterWeights
from server.engine.runner import CompactRunner
from server.engine.sequence import Sequence
from server.engine.types import GenerationRequest, SamplingParams

CONFIG = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=2048,
    architectures=["LlamaForCausalLM"],
)
MAX_SEQ_LEN = 640
OUT: Path | None = None


def report(record: dict) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if OUT is not None:
        with OUT.open("a") as out:
            out.write(line + "\n")


def build(directory: Path) -> None:
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**CONFIG)).to(torch.bfloat16)
    model.save_pretrained(directory)


def load(directory: Path) -> LoadedModel:
    model = AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.bfloat16, device_map={"": "cuda"}
    )
    return LoadedModel(model, None, directory, "f" * 64, "cuda", torch.bfloat16, "none")


def adapters(count: int, rank: int = 16) -> list[AdapterWeights]:
    """Random LoRAs on all seven projections, large enough to change greedy tokens."""
    generator = torch.Generator(device="cuda").manual_seed(1)
    shapes = {
        "q_proj": (2048, 2048),
        "k_proj": (2048, 256),
        "v_proj": (2048, 256),
        "o_proj": (2048, 2048),
        "gate_proj": (2048, 5632),
        "up_proj": (2048, 5632),
        "down_proj": (5632, 2048),
    }
    made = []
    for n in range(count):
        factors = {}
        for layer in range(CONFIG["num_hidden_layers"]):
            for module, (fan_in, fan_out) in shapes.items():
                a = torch.randn(rank, fan_in, generator=generator, device="cuda") / fan_in**0.5
                b = torch.randn(fan_out, rank, generator=generator, device="cuda") * 0.05
                factors[(layer, module)] = (a.bfloat16(), b.bfloat16())
        made.append(AdapterWeights(f"random{n}@1", rank, factors))
    assert {m for g in LLAMA_GROUPS.values() for m in g} == set(shapes)
    return made


def weight_bytes(model) -> int:
    """Bytes of the compact forward's weights: embedding, norms, every projection, head."""

    def size(obj) -> int:
        if obj is None or isinstance(obj, str | int | float):
            return 0
        if isinstance(obj, torch.Tensor):
            return obj.nbytes
        return sum(v.nbytes for v in vars(obj).values() if isinstance(v, torch.Tensor))

    total = size(model.embed) + size(model.norm) + size(model.lm_head)
    for layer in model.layers:
        total += sum(size(getattr(layer, f.name)) for f in dataclasses.fields(layer))
    return total


def sequence(name: str, prompt: list[int], new: int, adapter=None) -> Sequence:
    request = GenerationRequest(name, prompt, SamplingParams(new, 0.0), adapter)
    return Sequence(request, None, set(), lambda _: None)


def greedy(runner: CompactRunner, prompts, steps: int, lora=None) -> list[list[int]]:
    lora = lora or [None] * len(prompts)
    pairs = enumerate(zip(prompts, lora, strict=True))
    seqs = [sequence(f"g{i}", p, steps + 2, a) for i, (p, a) in pairs]
    for seq in seqs:
        runner.add(seq)
    for seq in seqs:
        logits = None
        while seq.cache_len < seq.prompt_len:
            logits = runner.prefill([seq])[0]
        seq.output_ids.append(int(logits.argmax()))
    for _ in range(steps):
        for seq, token in zip(seqs, runner.decode(seqs).argmax(-1).tolist(), strict=True):
            seq.output_ids.append(token)
    for seq in seqs:
        runner.release(seq)
    return [seq.output_ids for seq in seqs]


PROMPTS = [list(range(5, 40)), [7] * 70, [3, 1, 4, 1, 5], list(range(200, 300))]


def check_runner(loaded, name, weights, graphs, rows, steps, loras) -> None:
    started = time.perf_counter()
    config = EngineConfig(max_batch_size=max(rows), weights=weights, cuda_graphs=graphs)
    runner = CompactRunner(loaded, config, max_seq_len=MAX_SEQ_LEN)
    model = runner.model
    report(
        {
            "runner": name,
            "build_s": round(time.perf_counter() - started, 1),
            "weight_mib": round(weight_bytes(model) / 2**20, 1),
            "kernels": runner.kernels(),
        }
    )
    mixed = [loras[0], None, loras[1], loras[2]]
    alone = [greedy(runner, [p], 24, [a])[0] for p, a in zip(PROMPTS, mixed, strict=True)]
    together = greedy(runner, PROMPTS, 24, mixed)
    base_alone = [greedy(runner, [p], 24)[0] for p in PROMPTS]
    report(
        {
            "runner": name,
            "greedy_same_alone_and_mixed_batch": alone == together,
            "adapters_change_tokens": alone[0] != base_alone[0],
            "captures": len(runner.graphs.graphs) if runner.graphs else 0,
            "graphs": runner.graphs.describe() if runner.graphs else "off",
        }
    )
    with torch.inference_mode():
        for count in rows:
            ms = step_ms(runner, None, count, steps, [])
            report({"runner": name, "decode_rows": count, "step_ms": round(ms, 3),
                    "tok_per_s": round(count / ms * 1000)})  # fmt: skip
        for count in [r for r in rows if r >= 16]:
            ms = step_ms(runner, None, count, steps, loras)
            report({"runner": name, "decode_rows": count, "adapters": len(loras),
                    "step_ms": round(ms, 3), "tok_per_s": round(count / ms * 1000)})  # fmt: skip
    if graphs:  # the same arithmetic eagerly: how far the captured steps are from it
        graphed = greedy(runner, PROMPTS, 24, mixed)
        runner.graphs = None
        eager = greedy(runner, PROMPTS, 24, mixed)
        report({"runner": name, "greedy_same_graphs_and_eager": graphed == eager})
    del runner, model
    torch.cuda.empty_cache()


def check_prefill(loaded) -> None:
    """8 prompts of 200 tokens: alone (one forward each) against together (padded forwards
    shared), same logits?"""
    config = EngineConfig(max_batch_size=8, weights="dense")
    runner = CompactRunner(loaded, config, max_seq_len=MAX_SEQ_LEN)
    prompts = [list(range(1000 + 7 * i, 1200 + 7 * i)) for i in range(8)]
    results = {}
    for mode in ("unpadded", "alone", "together"):
        runner.model.fixed_prefill_rows = None if mode == "unpadded" else config.prefill_chunk
        seqs = [sequence(f"p{i}", p, 2) for i, p in enumerate(prompts)]
        for seq in seqs:
            runner.add(seq)
        torch.cuda.synchronize()
        started = time.perf_counter()
        if mode != "together":
            logits = [runner.prefill([seq])[0] for seq in seqs]
        else:
            logits = runner.prefill(seqs)
        torch.cuda.synchronize()
        results[mode] = (time.perf_counter() - started, torch.stack(logits))
        for seq in seqs:
            runner.release(seq)
    report(
        {
            "prefill_8x200_one_at_a_time_unpadded_ms": round(results["unpadded"][0] * 1000, 1),
            "prefill_8x200_alone_ms": round(results["alone"][0] * 1000, 1),
            "prefill_8x200_together_ms": round(results["together"][0] * 1000, 1),
            "prefill_logits_same": torch.equal(results["alone"][1], results["together"][1]),
            "prefill_rows": runner.kernels()["prefill_rows"],
        }
    )
    del runner
    torch.cuda.empty_cache()


def check_hf(loaded, rows: list[int], new_tokens: int) -> None:
    model = loaded.model
    for cache in ("dynamic", "static"):
        for count in rows:
            ids = torch.randint(100, 30000, (count, 32), device="cuda")
            kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, pad_token_id=0)  # fmt: skip
            if cache == "static":
                kwargs["cache_implementation"] = "static"
            started = time.perf_counter()
            model.generate(ids, **kwargs)  # the first static call compiles
            torch.cuda.synchronize()
            first = time.perf_counter() - started
            started = time.perf_counter()
            model.generate(ids, **kwargs)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - started
            report({"hf_generate": cache, "batch": count, "first_call_s": round(first, 1),
                    "tok_per_s": round(count * new_tokens / seconds, 1)})  # fmt: skip


def guarded(step, *args) -> None:
    try:
        step(*args)
    except Exception as error:  # keep measuring the rest; the trace goes to the log
        traceback.print_exc()
        report({"step": step.__name__, "args": str(args[1:3]), "error": repr(error)[:400]})


def main() -> None:
    global OUT
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="1,16,64,128")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--hf-rows", default="1,64")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    OUT = args.out
    rows = [int(r) for r in args.rows.split(",")]
    report({"device": torch.cuda.get_device_name(), "torch": torch.__version__})
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        started = time.perf_counter()
        build(directory)
        loaded = load(directory)
        report({"load_s": round(time.perf_counter() - started, 1),
                "hf_gpu_memory_mib": round(torch.cuda.memory_allocated() / 2**20)})  # fmt: skip
        loras = adapters(4)
        guarded(check_runner, loaded, "bf16-graphs", "dense", True, rows, args.steps, loras)
        guarded(check_runner, loaded, "int4-graphs", "int4", True, rows, args.steps, loras)
        guarded(check_runner, loaded, "bf16-eager", "dense", False, [1, 64], 20, loras)
        guarded(check_prefill, loaded)
        guarded(check_hf, loaded, [int(r) for r in args.hf_rows.split(",")], 64)


if __name__ == "__main__":
    main()
