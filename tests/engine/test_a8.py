"""The a8 kernel (server/engine/csrc/a8_linear.cpp): 4- or 8-bit weights times int8
activations, built with the system compiler. What the engine relies on: the weight grid's
products to float32 rounding, and a row's bits independent of the other rows, the thread
count and the instruction set."""

from __future__ import annotations

import pytest
import torch

from server.engine import native
from server.engine.a8 import A8Linear, lies_on_4bit_grid

pytestmark = pytest.mark.skipif(
    native.unavailable_reason() is not None, reason=f"a8 kernel: {native.unavailable_reason()}"
)

SHAPES = [(64, 96), (160, 576), (48, 2048)]


def quantized_rows(x: torch.Tensor) -> torch.Tensor:
    """x as the kernel sees it: int8 codes per block of 32, one float32 scale each."""
    blocks = x.float().view(x.shape[0], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    inverse = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    codes = torch.round(blocks * inverse)
    return (codes.double() * (amax.double() / 127)).view_as(x)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("out_features", "in_features"), SHAPES)
def test_products_are_the_weight_grid_times_int8_rows(bits, dtype, out_features, in_features):
    torch.manual_seed(0)
    weight = (torch.randn(out_features, in_features) * 0.05).to(dtype)
    linear = A8Linear(weight, bits)
    x = torch.randn(13, in_features).to(dtype)
    out = linear(x)
    assert out.dtype == dtype and out.shape == (13, out_features)
    expected = quantized_rows(x) @ linear.dense.double().t()
    scale = expected.abs().max().item()
    tolerance = 1e-5 if dtype == torch.float32 else 2**-8
    assert (out.double() - expected).abs().max().item() <= tolerance * scale
    # and close to the grid's product with the rows unquantized (int8 blocks' rounding only)
    unquantized = x.double() @ linear.dense.double().t()
    assert (out.double() - unquantized).abs().max().item() <= 0.02 * scale


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_row_has_the_same_bits_alone_in_any_batch_thread_count_and_instruction_set(bits, dtype):
    torch.manual_seed(1)
    weight = (torch.randn(160, 576) * 0.05).to(dtype)
    weight[:, :32] *= 40  # 8-bit codes near 0 and 255 in some groups: no int16 saturation
    isas = [1, 2, 3][: native.library().a8_isa()]  # AVX2, AVX-512 VNNI, AMX-INT8
    batch = torch.randn(19, 576).to(dtype)  # two full tiles of 8 rows and a remainder
    reference = A8Linear(weight, bits, isa=isas[0])(batch)
    threads = torch.get_num_threads()
    try:
        for isa in isas:
            linear = A8Linear(weight, bits, isa=isa)
            for count in (1, 2):
                torch.set_num_threads(count)
                assert torch.equal(linear(batch), reference)
                for row in (0, 7, 8, 18):
                    assert torch.equal(linear(batch[row : row + 1]), reference[row : row + 1])
                assert torch.equal(linear(batch[5:14]), reference[5:14])
                assert torch.equal(linear(batch[2:16]), reference[2:16])  # AMX from 12 rows
    finally:
        torch.set_num_threads(threads)


def test_rows_any_distance_apart_are_read_in_place():
    """A norm's output slice (rows 2 x features apart) gives the bits of its contiguous copy."""
    torch.manual_seed(0)
    linear = A8Linear(torch.randn(64, 96), 4)
    wide = torch.randn(5, 192, dtype=torch.bfloat16)
    assert torch.equal(linear(wide[:, :96]), linear(wide[:, :96].contiguous()))


def test_the_bundled_q4_1_layout_packs_exactly():
    """Weights already on a 4-bit grid of 32-wide groups (the bundled GGUF's Q4_1) keep
    their values: the kernel multiplies the checkpoint's own grid."""
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (64, 96)).float()
    codes[:, ::32] = 0
    codes[:, 1::32] = 15
    # Q4_1 stores each group's scale and minimum in float16, as the kernel reads them
    scale = (torch.rand(64, 3, 1) * 0.01 + 0.001).half().float()
    low = (torch.randn(64, 3, 1) * 0.01).half().float()
    weight = (codes.view(64, 3, 32) * scale + low).view(64, 96)
    linear = A8Linear(weight, 4)
    torch.testing.assert_close(linear.dense, weight, rtol=1e-5, atol=1e-6)
    x = torch.randn(4, 96)
    torch.testing.assert_close(linear(x), (quantized_rows(x) @ weight.double().t()).float())
    # which is how `engine.weights: auto` tells a 4-bit checkpoint (w4a8) from others (w8a8)
    assert lies_on_4bit_grid(weight) and lies_on_4bit_grid(weight.bfloat16())
    five_bit = (torch.randint(0, 32, (64, 96)).float().view(64, 3, 32) * scale + low).view(64, 96)
    assert not lies_on_4bit_grid(five_bit)
    assert not lies_on_4bit_grid(torch.randn(64, 96))


def test_wide_prompt_chunks_use_the_same_grid_dequantized():
    torch.manual_seed(0)
    weight = torch.randn(64, 96) * 0.05
    linear = A8Linear(weight, 8)
    x = torch.randn(40, 96)
    torch.testing.assert_close(linear(x, wide=True), x @ linear.dense.t())


def test_other_dtypes_are_refused_with_a_reason():
    linear = A8Linear(torch.randn(32, 64) * 0.05, 4)
    with pytest.raises(TypeError, match="bf16 or fp32"):
        linear(torch.randn(2, 64, dtype=torch.float16))


def test_a_missing_compiler_is_named(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    with pytest.raises(native.KernelUnavailable, match="C\\+\\+ compiler"):
        native._compiler()
