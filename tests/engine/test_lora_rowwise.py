"""Decode-time LoRA on the packed int8 kernel (server/engine/lora_rowwise.py): which runners
take it, that it applies the adapter as the float path does (to int8 rounding), and that a
row's tokens do not depend on which adapters its neighbours use or how many rows there are."""

from __future__ import annotations

import pytest
import torch

from server.engine import native
from server.engine.a8 import A8Linear
from server.engine.lora_rowwise import (
    INNER_MULTIPLE,
    KernelRows,
    SlotTable,
    add_rowwise,
    pack_pair,
)
from tests.engine.test_runner import (  # noqa: F401  (tiny, tiny_bf16: fixtures)
    PROMPTS,
    generate,
    runner_for,
    sequence,
    tiny,
    tiny_adapter,
    tiny_bf16,
)


def test_the_kernel_computes_each_row_on_its_own():
    """The property the route rests on: a row's bits are the same alone, at any row count
    and at any position in the batch."""
    torch.manual_seed(0)
    a, b = torch.randn(64, 24), torch.randn(24, 96)  # A [in, width], B [width, out]
    pair = pack_pair(a, b, list(range(24)))
    assert pair.a.shape == (2 * INNER_MULTIPLE, 64)  # width padded to the kernel's multiple
    x = torch.randn(16, 64, dtype=torch.bfloat16)
    every = add_rowwise([(None, pair)], x, torch.zeros(16, 96, dtype=torch.bfloat16))
    for rows in (1, 3, 7):
        for start in (0, 16 - rows):
            part = x[start : start + rows]
            alone = add_rowwise([(None, pair)], part, torch.zeros(rows, 96, dtype=torch.bfloat16))
            assert torch.equal(alone, every[start : start + rows])
    # a slot over some rows of the batch: the others get exact zeros added
    rows = torch.tensor([2, 5, 11])
    some = add_rowwise([(rows, pair)], x, torch.zeros(16, 96, dtype=torch.bfloat16))
    assert torch.equal(some[rows], every[rows])
    assert not some[[0, 1, 3, 4, 6]].any()
    # and it is the float product to int8 rounding
    exact = (x.float() @ a) @ b
    assert (some[rows].float() - exact[rows]).abs().max() < 0.02 * exact.abs().max()


@pytest.mark.skipif(native.unavailable_reason() is not None, reason="the kernels do not build")
@pytest.mark.parametrize("isa", [1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_lora_rows_kernel_adds_each_rows_own_slot_in_one_call(dtype, isa, monkeypatch):
    """csrc/lora_rows.cpp (its AVX2 and AVX-512 paths): rows of two slots (different widths)
    and base rows in one call; a row's bits are those it gets alone and with any thread
    count, base rows get nothing, and each slot's rows get what torch's int8 route gives
    them, to rounding."""
    if isa == 2 and native.library().a8_isa() < 2:
        pytest.skip("no AVX-512 VNNI here")
    monkeypatch.setattr(native, "chosen_isa", lambda: isa)
    torch.manual_seed(0)
    pairs = {
        0: pack_pair(torch.randn(64, 24) * 0.1, torch.randn(24, 96) * 0.1, list(range(24))),
        2: pack_pair(torch.randn(64, 40) * 0.1, torch.randn(40, 96) * 0.1, list(range(40))),
    }
    table = SlotTable(3)
    for slot, pair in pairs.items():
        table.set(slot, pair)
    slots = [0, -1, 2, 0, 2, 2, -1, 0, 1, 0]  # slot 1 holds nothing: its row gets nothing
    row_slot = torch.tensor(slots, dtype=torch.int32)
    x = torch.randn(len(slots), 64).to(dtype)
    base = torch.randn(len(slots), 96).to(dtype)
    every = add_rowwise(KernelRows(row_slot, table), x, base.clone())
    assert torch.equal(every[[1, 6, 8]], base[[1, 6, 8]])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(add_rowwise(KernelRows(row_slot, table), x, base.clone()), every)
    finally:
        torch.set_num_threads(threads)
    for row in range(len(slots)):
        alone = add_rowwise(KernelRows(row_slot[row : row + 1], table), x[row : row + 1],
                            base[row : row + 1].clone())  # fmt: skip
        assert torch.equal(alone, every[row : row + 1])
    terms = [
        (torch.tensor([r for r, s in enumerate(slots) if s == k]), p) for k, p in pairs.items()
    ]
    torch_route = add_rowwise(terms, x, base.clone()).float()
    delta = (torch_route - base.float()).abs().max()
    assert (every.float() - torch_route).abs().max() < 0.02 * delta


@pytest.mark.skipif(native.unavailable_reason() is not None, reason="the kernels do not build")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_a8_gemm_adds_the_lora_rows_in_the_same_call_with_the_same_bits(dtype):
    """A8Linear(x, lora=rows) == A8Linear(x) + add_rowwise(rows): one call, the same bits,
    rows read in place from a norm's strided output (lora.project takes this route)."""
    torch.manual_seed(0)
    linear = A8Linear(torch.randn(96, 64).to(dtype), 4)
    pair = pack_pair(torch.randn(64, 24) * 0.1, torch.randn(24, 96) * 0.1, list(range(24)))
    table = SlotTable(2)  # holds pointers: `pair` stays referenced
    table.set(1, pair)
    rows = KernelRows(torch.tensor([1, -1, 1, 0], dtype=torch.int32), table)
    wide = torch.randn(4, 128).to(dtype)
    x = wide[:, :64]  # rows 128 apart, as _rms_norm's slice
    fused = linear(x, lora=rows)
    assert torch.equal(fused, add_rowwise(rows, x, linear(x.contiguous())))
    assert torch.equal(fused[1], linear(x)[1]) and not torch.equal(fused[0], linear(x)[0])


@pytest.mark.parametrize("fixture", ["tiny", "tiny_bf16"])
def test_packed_weights_decode_lora_rowwise_dense_weights_do_not(fixture, request):
    loaded = request.getfixturevalue(fixture)
    assert runner_for(loaded, weights="int4").kernels()["lora_decode"] == "int8-rowwise"
    assert runner_for(loaded, weights="int8").lora.rowwise_decode
    dense = runner_for(loaded, weights="dense")
    assert not dense.lora.rowwise_decode and dense.kernels()["lora_decode"] != "int8-rowwise"


@pytest.mark.parametrize("fixture", ["tiny", "tiny_bf16"])
def test_rowwise_lora_is_the_float_lora_to_rounding(fixture, request, tmp_path):
    """The same decode step with the adapter's factors in int8 (rowwise) and in float (the
    route a dense-weight runner takes) gives close logits, and both move them off the base
    model's by far more than that."""
    loaded = request.getfixturevalue(fixture)
    probe = runner_for(loaded, weights="int4", max_loras=2, max_lora_rank=8)
    adapter = tiny_adapter(loaded, probe, tmp_path / "a", 8, 3)

    def first_step(rowwise: bool, with_adapter: bool) -> torch.Tensor:
        runner = runner_for(loaded, weights="int4", max_loras=2, max_lora_rank=8)
        runner.lora.rowwise_decode = rowwise
        seqs = [sequence(PROMPTS[1], adapter if with_adapter else None)]
        generate(runner, seqs, 0)
        return runner.decode(seqs).float()

    rowwise, float_lora = first_step(True, True), first_step(False, True)
    base = first_step(True, False)
    rounding = (rowwise - float_lora).abs().max()
    assert rounding < 0.05 * float_lora.abs().max()
    assert (float_lora - base).abs().max() > 10 * rounding


@pytest.mark.parametrize("fixture", ["tiny", "tiny_bf16"])
def test_rowwise_rows_keep_their_tokens_beside_any_neighbours(fixture, request, tmp_path):
    """Two adapters and the base model in one batch of different lengths: each row's greedy
    tokens are those it gets alone, with and without the fixed-row path of AMX/MKL CPUs."""
    loaded = request.getfixturevalue(fixture)

    def runner(fixed: bool):
        made = runner_for(loaded, weights="int4", max_loras=2, max_lora_rank=8)
        if fixed:
            made.model.fixed_decode_rows = 4
        return made

    probe = runner(False)
    adapters = [tiny_adapter(loaded, probe, tmp_path / f"a{i}", 4 + 4 * i, i) for i in range(2)]
    jobs = [(PROMPTS[0], adapters[0]), (PROMPTS[1], None), ([7] * 70, adapters[1])]
    for fixed in (False, True):
        together = generate(runner(fixed), [sequence(p, a) for p, a in jobs], 20)
        for (prompt, adapter), tokens in zip(jobs, together, strict=True):
            assert generate(runner(fixed), [sequence(prompt, adapter)], 20) == [tokens]
        # the same rows with a neighbour on the same adapter (every row of a slot at once)
        pair = [sequence(PROMPTS[0], adapters[0]), sequence(PROMPTS[2], adapters[0])]
        assert generate(runner(fixed), pair, 20)[0] == together[0]


@pytest.mark.skipif(native.unavailable_reason() is not None, reason="the kernels do not build")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("count", [1, 4, 16, 40])
def test_the_a8_gemm_takes_the_norm_before_and_the_residual_after_with_the_same_bits(dtype, count):
    """A8Linear(x, norm=..., out_norm=..., residual=r) == r + rms_norm(A8Linear(rms_norm(x)))
    bit for bit, LoRA rows included (DecoderModel._project fuses a layer's norms and
    residual adds so); 40 rows of 2,048 features normalize on the whole thread team."""
    from server.engine.rms_norm import rms_norm

    torch.manual_seed(count)
    features = 2048 if count == 40 else 64
    linear = A8Linear(torch.randn(96, features).to(dtype), 4)
    pair = pack_pair(torch.randn(features, 8) * 0.1, torch.randn(8, 96) * 0.1, list(range(8)))
    table = SlotTable(2)  # holds pointers: `pair` stays referenced
    table.set(1, pair)
    slots = torch.tensor([(1, -1, 0)[i % 3] for i in range(count)], dtype=torch.int32)
    weight = torch.rand(features) + 0.5
    x = (torch.randn(count, features) * 3).to(dtype)
    residual = torch.randn(count, 96).to(dtype)
    normed = rms_norm(x, weight, 1e-6)
    after = torch.rand(96) + 0.5  # a norm of the product (Gemma 3's post-norms)
    for rows in (None, KernelRows(slots, table)):
        fused = linear(x, lora=rows, norm=(weight, 1e-6), residual=residual)
        assert torch.equal(fused, residual + linear(normed, lora=rows))
        assert torch.equal(linear(x, lora=rows, norm=(weight, 1e-6)), linear(normed, lora=rows))
        post = linear(x, lora=rows, norm=(weight, 1e-6), out_norm=(after, 1e-5), residual=residual)
        assert torch.equal(post, residual + rms_norm(linear(normed, lora=rows), after, 1e-5))
    with pytest.raises(ValueError, match="residual"):
        linear(x, residual=residual[:, :48])
    with pytest.raises(ValueError, match="float32 weight"):
        linear(x, norm=(weight[:32], 1e-6))
    with pytest.raises(ValueError, match="float32 weight of 96"):
        linear(x, out_norm=(weight, 1e-6))
