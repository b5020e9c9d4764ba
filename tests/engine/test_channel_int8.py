"""The vocabulary projection on ragtune's int8 kernel (server/engine/channel_int8.py): the
logits of oneDNN's W8A8Linear bit for bit, a row's bits its own at any row count, and the
head the int4 kinds serve through where the CPU has AVX-512 VNNI."""

from __future__ import annotations

import pytest
import torch

from server.engine.channel_int8 import ChannelInt8Linear
from server.engine.linear import W8A8Linear, head_linear

pytestmark = pytest.mark.skipif(
    not ChannelInt8Linear.supported(), reason="the int8 head kernel needs AVX-512 VNNI (no AMX)"
)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("outputs", [4096, 4096 + 48, 16])  # whole tiles, a part tile, one block
def test_logits_equal_onednn_and_each_row_stands_alone(dtype, outputs):
    if W8A8Linear.mode() != "shifted":
        pytest.skip("oneDNN's int8 linear does not sum the shifted form exactly here")
    torch.manual_seed(0)
    weight = (torch.randn(outputs, 576) * 0.05).bfloat16()
    x = (torch.randn(37, 576) * 4).to(dtype)
    x[3] = 0  # a row of zeros: the scale's floor, codes all zero
    kernel, onednn = ChannelInt8Linear(weight), W8A8Linear(weight)
    full = kernel(x)
    assert full.dtype == torch.float32 and full.shape == (37, outputs)
    assert torch.equal(full, onednn(x))
    for lo, hi in ((0, 1), (5, 6), (3, 8), (0, 16), (20, 37), (4, 4)):
        assert torch.equal(kernel(x[lo:hi]), full[lo:hi])
    # rows any distance apart (a slice of a wider tensor) and leading dimensions
    wide = torch.cat((x, x), dim=1)
    assert torch.equal(kernel(wide[:, :576]), full)
    assert torch.equal(kernel(x.view(1, 37, 576)), full.view(1, 37, outputs))


def test_int4_kinds_serve_their_logits_through_it():
    weight = (torch.randn(256, 64) * 0.05).bfloat16()
    for weights in ("int4", "w4a8", "w8a8"):
        assert isinstance(head_linear(weights, weight), ChannelInt8Linear)


def test_other_dtypes_are_refused():
    linear = ChannelInt8Linear((torch.randn(64, 64) * 0.05).bfloat16())
    with pytest.raises(TypeError, match="bf16 or fp32"):
        linear(torch.randn(2, 64, dtype=torch.float16))


def test_a_row_with_nan_or_inf_comes_out_non_finite_as_on_onednn():
    """An adapter that overflows makes NaN activations: their logits must stay non-finite
    (the sampler refuses such a row, tests/faults/test_nonfinite_adapter.py), as oneDNN's
    route keeps them; the rows beside them unchanged."""
    torch.manual_seed(0)
    weight = (torch.randn(4096, 576) * 0.05).bfloat16()
    x = torch.randn(4, 576).bfloat16()
    x[1, 100] = float("nan")
    x[2, 7] = float("inf")
    kernel, onednn = ChannelInt8Linear(weight), W8A8Linear(weight)
    logits, reference = kernel(x), onednn(x)
    assert torch.isfinite(logits.sum(-1)).tolist() == [True, False, False, True]
    assert torch.isfinite(reference.sum(-1)).tolist() == [True, False, False, True]
    assert torch.equal(logits[[0, 3]], reference[[0, 3]])
