"""The CUDA path, where a GPU is present (skipped elsewhere; bench/gpu_check.py measures it at
1.1B scale): decode steps replayed from captured graphs give the bits of the same static
steps run eagerly, a row's tokens alone == in a mixed-adapter batch, and the packed int4
kind multiplies by the grid it stores."""

from __future__ import annotations

import pytest
import torch

from ragtune.config import EngineConfig
from ragtune.models.loader import LoadedModel
from server.engine.lora import AdapterWeights
from server.engine.runner import CompactRunner
from server.engine.sequence import Sequence
from server.engine.types import GenerationRequest, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def tiny_cuda() -> LoadedModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    return LoadedModel(model, None, None, "f" * 64, "cuda", torch.bfloat16, "none")


def adapter(seed: int) -> AdapterWeights:
    generator = torch.Generator(device="cuda").manual_seed(seed)
    factors = {}
    for layer in range(2):
        for module, (fan_in, fan_out) in {"q_proj": (128, 128), "down_proj": (256, 128)}.items():
            a = torch.randn(8, fan_in, generator=generator, device="cuda") / fan_in**0.5
            b = torch.randn(fan_out, 8, generator=generator, device="cuda") * 0.5
            factors[(layer, module)] = (a.bfloat16(), b.bfloat16())
    return AdapterWeights(f"a{seed}@1", 8, factors)


def greedy(runner: CompactRunner, jobs, steps: int) -> list[list[int]]:
    seqs = []
    for i, (prompt, lora) in enumerate(jobs):
        request = GenerationRequest(f"r{i}", prompt, SamplingParams(steps + 2, 0.0), lora)
        seqs.append(Sequence(request, None, set(), lambda _: None))
        runner.add(seqs[-1])
    for seq in seqs:
        logits = runner.prefill([seq])[0]
        seq.output_ids.append(int(logits.argmax()))
    for _ in range(steps):
        for seq, token in zip(seqs, runner.decode(seqs).argmax(-1).tolist(), strict=True):
            seq.output_ids.append(token)
    for seq in seqs:
        runner.release(seq)
    return [seq.output_ids for seq in seqs]


@pytest.mark.parametrize("weights", ["dense", "int4"])
def test_graphs_replay_the_static_steps_and_keep_rows_independent(tiny_cuda, weights):
    config = EngineConfig(max_batch_size=4, weights=weights, max_loras=2, max_lora_rank=8)
    adapters = [adapter(1), adapter(2)]
    jobs = [(list(range(5, 40)), adapters[0]), ([3, 1, 4], None), ([7] * 60, adapters[1])]
    runner = CompactRunner(tiny_cuda, config, max_seq_len=128)
    assert runner.kernels()["decode_graphs"].startswith("cuda-graphs")
    together = greedy(runner, jobs, 16)
    assert runner.graphs.graphs and runner.graphs.failure is None
    for job, tokens in zip(jobs, together, strict=True):
        assert greedy(runner, [job], 16) == [tokens]
    uncaptured = CompactRunner(tiny_cuda, config, max_seq_len=128)
    uncaptured.graphs.capture = False
    assert greedy(uncaptured, jobs, 16) == together


def test_int4_multiplies_by_its_grid():
    from server.engine.linear_gpu import Int4GpuLinear
    from server.engine.quantize import int4_dequantized, int4_grid

    weight = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(5, 512, device="cuda", dtype=torch.bfloat16)
    codes, scales_zeros = int4_grid(weight, Int4GpuLinear.GROUP)
    expected = x.float() @ int4_dequantized(codes, scales_zeros).t()
    torch.testing.assert_close(Int4GpuLinear(weight)(x).float(), expected, rtol=0.02, atol=0.1)
