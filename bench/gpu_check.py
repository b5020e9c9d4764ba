"""The CUDA path, on a random-weight ~1B Llama (TinyLlama-1.1B's shape: GPU machines here
cannot download models): load it with bitsandbytes NF4 on the GPU, check that a row's greedy
tokens are the same alone and in a batch there, time the engine's decode step at several batch
sizes, a 512-token prefill, and Hugging Face's `generate` on the same NF4 model. One JSON line
per measurement.

    python bench/gpu_check.py --rows 1,16,64 --steps 40
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_step import step_ms

from ragtune.config import EngineConfig
from ragtune.models.loader import LoadedModel
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


def build(directory: Path) -> None:
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**CONFIG)).to(torch.bfloat16)
    model.save_pretrained(directory)


def load(directory: Path) -> LoadedModel:
    nf4 = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    model = AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.bfloat16, device_map={"": "cuda"}, quantization_config=nf4
    )
    return LoadedModel(model, None, directory, "f" * 64, "cuda", torch.bfloat16, "nf4")


def greedy(runner: CompactRunner, prompts: list[list[int]], steps: int) -> list[list[int]]:
    seqs = []
    for i, prompt in enumerate(prompts):
        request = GenerationRequest(f"g{i}", prompt, SamplingParams(steps + 2, 0.0), None)
        seq = Sequence(request, None, set(), lambda _: None)
        runner.add(seq)
        seqs.append(seq)
    for seq in seqs:
        while seq.cache_len < seq.prompt_len:
            logits = runner.prefill([seq])[0]
        seq.output_ids.append(int(logits.argmax()))
    for _ in range(steps):
        for seq, token in zip(seqs, runner.decode(seqs).argmax(-1).tolist(), strict=True):
            seq.output_ids.append(token)
    for seq in seqs:
        runner.release(seq)
    return [seq.output_ids for seq in seqs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="1,16,64")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__}))
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        started = time.perf_counter()
        build(directory)
        loaded = load(directory)
        params = sum(p.numel() for p in loaded.model.parameters())
        print(
            json.dumps(
                {
                    "load_s": round(time.perf_counter() - started, 1),
                    "linear_weight_type": type(
                        loaded.model.model.layers[0].mlp.up_proj.weight
                    ).__name__,
                    "parameters_stored": params,
                    "gpu_memory_mib": round(torch.cuda.memory_allocated() / 2**20),
                }
            )
        )
        config = EngineConfig(max_batch_size=max(rows), weights="auto")
        runner = CompactRunner(loaded, config, max_seq_len=640)
        model = runner.model
        prompts = [list(range(5, 40)), [7] * 70, [3, 1, 4, 1, 5], list(range(200, 300))]
        alone = [greedy(runner, [p], 24)[0] for p in prompts]
        together = greedy(runner, prompts, 24)
        print(
            json.dumps(
                {
                    "weights": model.weights,
                    "rows_independent": model.rows_independent,
                    "greedy_same_alone_and_batched": alone == together,
                }
            )
        )
        with torch.inference_mode():
            for count in rows:
                ms = step_ms(runner, None, count, args.steps)
                print(
                    json.dumps(
                        {
                            "decode_rows": count,
                            "step_ms": round(ms, 2),
                            "tok_per_s": round(count / ms * 1000),
                        }
                    )
                )
            seq = Sequence(
                GenerationRequest("p", list(range(1, 513)), SamplingParams(4, 0.0), None),
                None, set(), lambda _: None,
            )  # fmt: skip
            runner.add(seq)
            torch.cuda.synchronize()
            started = time.perf_counter()
            while seq.cache_len < seq.prompt_len:
                runner.prefill([seq])
            torch.cuda.synchronize()
            prefill_ms = (time.perf_counter() - started) * 1000
            runner.release(seq)
            print(json.dumps({"prefill_512_tokens_ms": round(prefill_ms, 1)}))
            ids = torch.tensor([list(range(5, 40))], device="cuda")
            loaded.model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
            torch.cuda.synchronize()
            started = time.perf_counter()
            loaded.model.generate(
                ids, max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=0
            )
            torch.cuda.synchronize()
            seconds = time.perf_counter() - started
            print(json.dumps({"hf_generate_nf4_batch1_tok_per_s": round(64 / seconds, 1)}))


if __name__ == "__main__":
    main()
