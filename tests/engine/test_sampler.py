"""Sampling: greedy is argmax, a seed fixes the draw, top_p keeps only the nucleus."""

from __future__ import annotations

import torch

from server.engine.sampler import make_generator, sample_batch
from server.engine.types import SamplingParams


def test_greedy_rows_take_argmax_and_sampled_rows_use_their_seed():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    params = [
        SamplingParams(8, temperature=0),
        SamplingParams(8, temperature=1.0, seed=7),
        SamplingParams(8, temperature=1.0, seed=7),
    ]
    tokens = sample_batch(logits.clone(), params, [make_generator(p.seed) for p in params])
    assert tokens[0] == int(torch.argmax(logits[0]))
    again = sample_batch(logits.clone(), params, [make_generator(p.seed) for p in params])
    assert tokens == again


def test_top_p_keeps_only_the_nucleus():
    logits = torch.tensor([[5.0, 4.9, -10.0, -10.0, -10.0]])
    params = [SamplingParams(8, temperature=1.0, top_p=0.5, seed=s) for s in range(40)]
    draws = {sample_batch(logits, [p], [make_generator(p.seed)])[0] for p in params}
    assert draws == {0}  # token 0 alone holds >= 50% of the mass
    wide = [SamplingParams(8, temperature=1.0, top_p=0.99, seed=s) for s in range(40)]
    assert {sample_batch(logits, [p], [make_generator(p.seed)])[0] for p in wide} == {0, 1}
