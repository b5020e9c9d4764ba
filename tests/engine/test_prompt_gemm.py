"""Prompt chunks' dense GEMM (server/engine/prompt_gemm.py): a lone row is computed as the
first of two, so it takes the GEMM's many-row path. Where two-row and many-row calls agree on
a row (what the start-up check, models/exactness.py, needs for batched prefill and the prefix
cache), a one-row chunk must agree too: oneDNN's bf16 GEMM summed a lone row in another
order on an AVX-512 BF16 EPYC, which turned both features off there."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from server.engine import native
from server.engine.a8 import A8Linear
from server.engine.linear import DenseLinear, Int4Linear, Int8Linear, W8A8Linear
from server.engine.prompt_gemm import wide_linear

# (out, in): SmolLM2's down projection (the shape that showed it), and its q projection
SHAPES = [(576, 1536), (576, 576)]


def kinds() -> list[tuple[str, object]]:
    found = [("dense", DenseLinear), ("int8", Int8Linear), ("int4", Int4Linear)]
    if W8A8Linear.supported():
        found.append(("w8a8", W8A8Linear))
    if native.unavailable_reason() is None:
        found.append(("a8", lambda weight: A8Linear(weight, bits=8)))
    return found


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("out_features", "in_features"), SHAPES)
def test_a_lone_row_is_the_first_of_two(dtype, out_features, in_features):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=generator).to(dtype)
    x = torch.randn(3, in_features, generator=generator).to(dtype)
    lone = wide_linear(x[:1], weight)
    assert lone.shape == (1, out_features)
    assert torch.equal(lone, F.linear(x[:1].expand(2, -1).contiguous(), weight)[:1])
    assert torch.equal(wide_linear(x, weight), F.linear(x, weight))  # more rows: unchanged
    assert wide_linear(x[:1].view(1, 1, -1), weight).shape == (1, 1, out_features)


@pytest.mark.parametrize(("name", "kind"), kinds())
@pytest.mark.parametrize(("out_features", "in_features"), SHAPES)
def test_a_one_row_prompt_chunk_has_a_many_row_chunks_bits(name, kind, out_features, in_features):
    """Many draws: the lone-row path differed from the many-row one on a few rows in a
    hundred (SmolLM2's down projection, 15 of 320), not on every row."""
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(out_features, in_features, generator=generator).bfloat16()
    linear = kind(weight)
    for _ in range(12):
        x = torch.randn(64, in_features, generator=generator).bfloat16()
        many = linear(x, wide=True)
        if not torch.equal(linear(x[:2], wide=True), many[:2]):
            pytest.skip(
                f"{name}: this CPU's GEMM gives two rows other bits than 64 (checked at start)"
            )
        for row in range(0, 64, 8):
            lone = linear(x[row : row + 1], wide=True)
            assert torch.equal(lone, many[row : row + 1]), (name, row)
