"""Decode steps of fixed shapes (the steps CUDA graphs capture, engine/cuda_graphs.py) and
prompt forwards padded to a fixed row count (GPUs): run here eagerly on the CPU, where the
arithmetic they record is the same, so every CPU checks it; tests/engine/test_cuda.py
replays them from real graphs where a GPU is present."""

from __future__ import annotations

import pytest
import torch

from ragtune.config import EngineConfig
from server.engine.cuda_graphs import GraphedDecode, key_lengths, row_buckets
from server.engine.kernel_choice import decode_weights
from server.engine.kv_cache import KVCache
from server.engine.models.exactness import PaddedExtents
from server.engine.runner import CompactRunner
from tests.engine.test_runner import (  # noqa: F401  (tiny, tiny_bf16: fixtures)
    PROMPTS,
    generate,
    sequence,
    tiny,
    tiny_adapter,
    tiny_bf16,
)


def static_runner(loaded, fixed_rows: int | None = None, **engine) -> CompactRunner:
    """A runner whose decode steps all go through `decode_static`, optionally on a fixed row
    count (as on devices whose GEMMs depend on it)."""
    settings = {"max_batch_size": 4, "weights": "dense", "max_loras": 2, "max_lora_rank": 8}
    config = EngineConfig(**{**settings, **engine})
    runner = CompactRunner(loaded, config, max_seq_len=128, static_decode=True)
    if fixed_rows is not None:
        runner.model.fixed_decode_rows = fixed_rows
        runner.graphs = GraphedDecode(runner.model, runner.cache, runner.lora, capture=False)
    return runner


@pytest.mark.parametrize("fixed_rows", [None, 4])
@pytest.mark.parametrize("fixture", ["tiny", "tiny_bf16"])
def test_static_steps_keep_rows_independent_of_neighbours_and_adapters(
    fixture, fixed_rows, request, tmp_path
):
    """A row's greedy tokens alone == in a batch of other lengths and other adapters (every
    slot's factors apply to every row, masked), and the first step's logits are those of the
    usual decode path."""
    loaded = request.getfixturevalue(fixture)
    probe = static_runner(loaded)
    assert probe.kernels()["decode_graphs"].startswith("static")
    adapters = [tiny_adapter(loaded, probe, tmp_path / f"a{i}", 4 + 4 * i, i) for i in range(2)]
    jobs = [(PROMPTS[0], None), (PROMPTS[1], adapters[0]), ([7] * 70, adapters[1])]
    together = generate(static_runner(loaded, fixed_rows), [sequence(p, a) for p, a in jobs], 24)
    for (prompt, adapter), tokens in zip(jobs, together, strict=True):
        alone = generate(static_runner(loaded, fixed_rows), [sequence(prompt, adapter)], 24)
        assert alone == [tokens]
    settings = {"max_batch_size": 4, "weights": "dense", "max_loras": 2, "max_lora_rank": 8}
    usual = CompactRunner(loaded, EngineConfig(**settings), max_seq_len=128)
    logits = []
    for runner in (usual, static_runner(loaded, fixed_rows)):
        seqs = [sequence(p, a) for p, a in jobs]
        generate(runner, seqs, 0)
        logits.append(runner.decode(seqs))
    tolerance = 0.02 if loaded.dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(logits[0], logits[1], rtol=tolerance, atol=tolerance)


def test_static_steps_pad_to_their_row_and_key_buckets(request):
    """Rows round up to a power of two where GEMMs are row-independent (else the fixed row
    count); keys to a power of two from 128 where the device's check found longer masked
    extents exact up to the whole cache, else the whole cache."""
    runner = static_runner(request.getfixturevalue("tiny"), max_batch_size=6)
    model = runner.model
    model.rows_independent, model.fixed_decode_rows = True, None
    assert row_buckets(model, 6) == [1, 2, 4, 6]
    assert key_lengths(model, 1000) == [128, 256, 512, 1000]
    model.rows_independent, model.fixed_decode_rows = False, 6
    assert row_buckets(model, 6) == [6]
    model.padded_extents = PaddedExtents(softmax=True, values=True, up_to=1024)
    assert key_lengths(model, 1000) == [128, 256, 512, 1000]
    model.padded_extents = PaddedExtents(softmax=True, values=True, up_to=512)  # 1000 unchecked
    assert key_lengths(model, 1000) == [1000]
    model.padded_extents = PaddedExtents(softmax=True, values=False, up_to=4096)
    assert key_lengths(model, 1000) == [1000]


def test_sparse_adapter_rows_take_the_eager_step(request):
    runner = static_runner(request.getfixturevalue("tiny"))
    runner.lora.sparse[1] = {}  # slot 1 holds a sparse adapter
    assert runner.graphs.covers([-1, 0]) and not runner.graphs.covers([0, 1])


def test_a_fixed_layout_cache_never_moves():
    """Captured graphs hold the cache's addresses: growing, shrinking and new slots keep them."""
    cache = KVCache(2, 4, 2, 96, 8, torch.float32, "cpu", fixed_layout=True)
    pointers = [t.data_ptr() for t in cache.keys_t + cache.values]
    assert cache.capacity == 96 and cache.slot_capacity == 4
    cache.keys_t[0][1, 0, 0, 5] = 3.0
    cache.fit(10, 2)
    cache.reserve(90, 2)
    cache.ensure_slots(4, 2)
    assert [t.data_ptr() for t in cache.keys_t + cache.values] == pointers
    assert cache.capacity == 96 and cache.keys_t[0][1, 0, 0, 5] == 3.0


@pytest.mark.parametrize("fixture", ["tiny", "tiny_bf16"])
def test_padded_prompt_forwards_are_shared_and_exact(fixture, request, tmp_path):
    """Where prompt forwards run on a fixed row count (GPUs), several prompts share one (as
    many as fit) and each gets the logits and tokens it gets alone."""
    loaded = request.getfixturevalue(fixture)

    def padded_runner() -> CompactRunner:
        settings = {"max_batch_size": 4, "weights": "dense", "max_loras": 2, "max_lora_rank": 8}
        runner = CompactRunner(loaded, EngineConfig(**settings), max_seq_len=128)
        runner.model.rows_independent = False
        runner.model.fixed_prefill_rows = 48
        return runner

    adapter = tiny_adapter(loaded, padded_runner(), tmp_path / "a", 4, 0)
    jobs = [(PROMPTS[0], None), (PROMPTS[1], adapter), ([7] * 30, None), (PROMPTS[2], adapter)]
    runner = padded_runner()
    seqs = [sequence(p, a) for p, a in jobs]
    for seq in seqs:
        runner.add(seq)
    chunks = [runner._chunk(seq) for seq in seqs]
    assert runner.model.prefill_groups(chunks) == [[0, 3], [1], [2]]  # 4+11 | 37 | 30 rows
    together = generate(padded_runner(), [sequence(p, a) for p, a in jobs], 6, shared_prefill=True)
    for (prompt, adapter), tokens in zip(jobs, together, strict=True):
        assert generate(padded_runner(), [sequence(prompt, adapter)], 6) == [tokens]


def test_int4_is_the_only_packed_kind_on_a_gpu(request):
    """engine.weights on CUDA: auto is dense, int4 is accepted under bf16, the CPU kinds are
    refused with a clear reason (checked without a GPU: only the resolution)."""
    from dataclasses import replace

    on_gpu = replace(request.getfixturevalue("tiny_bf16"), device="cuda")
    assert decode_weights(EngineConfig(weights="auto"), on_gpu) == "dense"
    assert decode_weights(EngineConfig(weights="int4"), on_gpu) == "int4"
    for kind in ("int8", "w8a8", "w4a8"):
        with pytest.raises(ValueError, match="int4 only"):
            decode_weights(EngineConfig(weights=kind), on_gpu)
