"""RMSNorm on ragtune's kernel (server/engine/rms_norm.py, csrc/rms_norm.cpp): Gemma's
arithmetic (float32 inside, one rounding), Llama's to one unit in the last place, rows read
in place from strided views, and a row's bits its own."""

from __future__ import annotations

import pytest
import torch

from server.engine import native
from server.engine.rms_norm import rms_norm

pytestmark = pytest.mark.skipif(
    native.unavailable_reason() is not None, reason=f"kernels: {native.unavailable_reason()}"
)


def reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma3RMSNorm's arithmetic with a float32 weight (1 + w there): one rounding."""
    h = x.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_is_rms_norm_with_one_rounding(dtype):
    torch.manual_seed(0)
    x, weight = torch.randn(37, 576).to(dtype) * 3, torch.rand(576) + 0.5
    out = rms_norm(x, weight, 1e-6)
    if dtype == torch.float32:
        torch.testing.assert_close(out, reference(x, weight, 1e-6), rtol=1e-6, atol=1e-6)
    else:  # within one bf16 unit in the last place of Gemma's route
        assert ((out.float() - reference(x, weight, 1e-6).float()).abs()
                <= out.float().abs() * 2**-7).all()  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_views_are_read_in_place_and_rows_are_their_own(dtype):
    """q heads of a fused q/k projection ([tokens, heads, d] with tokens (heads + kv) * d
    apart) and a norm's slice of wider rows give the bits of their contiguous copies; a row
    alone, among others, or with one thread gives the same bits."""
    torch.manual_seed(1)
    qk = torch.randn(5, 6, 64).to(dtype)
    q, weight = qk[:, :4], torch.rand(64) + 0.5
    assert torch.equal(rms_norm(q, weight, 1e-6), rms_norm(q.contiguous(), weight, 1e-6))
    wide = torch.randn(300, 1024).to(dtype)
    rows, weight = wide[:, :512], torch.rand(512) + 0.5  # 300 x 512: the threaded path
    every = rms_norm(rows, weight, 1e-5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(rms_norm(rows, weight, 1e-5), every)
    finally:
        torch.set_num_threads(threads)
    for row in (0, 7, 299):
        assert torch.equal(rms_norm(rows[row : row + 1], weight, 1e-5), every[row : row + 1])
