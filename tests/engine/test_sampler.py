"""Sampling: greedy is argmax, a seed fixes the draw, top_p keeps only the nucleus; the
per-row controls (top_k, min_p, logit_bias, penalties, min_tokens) and logprobs act on their
own row only, inside one batched step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from server.engine.controls import RowControls
from server.engine.sampler import make_generator, row_draws, sample_batch
from server.engine.types import SamplingParams

VOCAB = 50


def random_logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def draw_one(
    logits: torch.Tensor,
    params: SamplingParams,
    prompt: list[int] = (),
    history: list[int] = (),
    stop_ids: set[int] = frozenset(),
):
    """One row's (token, logprobs), its controls having already recorded `history`."""
    controls = RowControls(params, list(prompt), stop_ids) if params.shapes_logits else None
    for token in history:
        controls.record(token)
    draw = row_draws(logits[None], [params], [make_generator(params.seed)], [controls])[0]
    return draw()


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


def test_plain_greedy_rows_are_decided_without_controls_or_logprobs():
    logits = random_logits(4)
    draws = row_draws(logits, [SamplingParams(8, 0.0)] * 4, [make_generator(0)] * 4)
    assert [d() for d in draws] == [(int(t), None) for t in logits.numpy().argmax(-1)]


def test_top_k_one_is_greedy_and_top_k_keeps_the_k_best():
    logits = random_logits(1)[0]
    best = torch.argsort(logits, descending=True).tolist()
    for seed in range(20):
        assert draw_one(logits, SamplingParams(8, 1.0, seed=seed, top_k=1))[0] == best[0]
    drawn = {draw_one(logits, SamplingParams(8, 2.0, seed=s, top_k=3))[0] for s in range(60)}
    assert drawn <= set(best[:3]) and len(drawn) > 1


def test_min_p_drops_tokens_below_its_share_of_the_best():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04]))
    drawn = {draw_one(logits, SamplingParams(8, 1.0, seed=s, min_p=0.25))[0] for s in range(80)}
    assert drawn == {0, 1}  # 0.1 < 0.25 * 0.5


@pytest.mark.parametrize("temperature", [0.0, 1.0, 2.0])
def test_logit_bias_plus_100_forces_and_minus_100_bans(temperature):
    logits = random_logits(1)[0]
    best = int(torch.argmax(logits))
    target = int(torch.argmin(logits))
    for seed in range(10):
        forced = SamplingParams(8, temperature, seed=seed, logit_bias=((target, 100.0),))
        assert draw_one(logits, forced)[0] == target
    banned = SamplingParams(8, 0.0, logit_bias=((best, -100.0),))
    assert draw_one(logits, banned)[0] == int(torch.argsort(logits, descending=True)[1])


def test_repetition_penalty_matches_hugging_face_over_prompt_and_output():
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = random_logits(1, seed=3)[0]
    prompt, output = [1, 2, 3, 7], [7, 9, 9]
    params = SamplingParams(8, 0.0, repetition_penalty=1.7)
    controls = RowControls(params, prompt, set())
    for token in output:
        controls.record(token)
    expected = RepetitionPenaltyLogitsProcessor(1.7)(
        torch.tensor([prompt + output]), logits[None].clone()
    )[0]
    assert torch.equal(controls.shape(logits), expected)


def test_presence_and_frequency_penalties_count_output_tokens_only():
    logits = random_logits(1, seed=4)[0]
    params = SamplingParams(8, 0.0, presence_penalty=0.5, frequency_penalty=0.25)
    controls = RowControls(params, [1, 2, 3], set())
    for token in [5, 5, 5, 8]:
        controls.record(token)
    expected = logits.clone()
    expected[5] -= 3 * 0.25 + 0.5
    expected[8] -= 1 * 0.25 + 0.5
    assert torch.allclose(controls.shape(logits), expected)  # prompt tokens 1-3 untouched
    assert controls.shape(logits)[1:4].equal(logits[1:4])


def test_min_tokens_masks_stop_tokens_until_reached():
    logits = random_logits(1, seed=5)[0]
    eos = int(torch.argmax(logits))
    params = SamplingParams(8, 0.0, min_tokens=2)
    assert draw_one(logits, params, stop_ids={eos})[0] != eos
    assert draw_one(logits, params, history=[1], stop_ids={eos})[0] != eos
    assert draw_one(logits, params, history=[1, 2], stop_ids={eos})[0] == eos


def test_logprobs_are_the_raw_distribution_and_the_top_k_in_order():
    logits = random_logits(1, seed=6)[0]
    expected = torch.log_softmax(logits, -1)
    params = SamplingParams(8, 0.0, logprobs=5, logit_bias=((0, 30.0),))  # bias: token 0 drawn
    token, logprobs = draw_one(logits, params)
    assert token == 0 and logprobs.token_id == 0
    assert logprobs.logprob == pytest.approx(float(expected[0]))  # raw: before the bias
    ids = [t for t, _ in logprobs.top]
    assert ids == torch.argsort(expected, descending=True)[:5].tolist()
    assert [v for _, v in logprobs.top] == sorted((v for _, v in logprobs.top), reverse=True)
    greedy = draw_one(logits, SamplingParams(8, 0.0, logprobs=0))[1]
    assert greedy.top == () and greedy.token_id == ids[0]


def test_each_row_is_its_own_whatever_its_neighbours_ask():
    """A batch mixing plain greedy, plain sampled, controlled and logprob rows gives every row
    exactly what it gets alone: tokens and logprobs bit for bit."""
    logits = random_logits(5, seed=7)
    params = [
        SamplingParams(8, 0.0),
        SamplingParams(8, 0.9, top_p=0.9, seed=3),
        SamplingParams(8, 0.7, seed=4, top_k=5, min_p=0.05, repetition_penalty=1.3),
        SamplingParams(8, 0.0, logprobs=3, presence_penalty=1.0, logit_bias=((2, 5.0),)),
        SamplingParams(8, 1.0, seed=5, logprobs=2, frequency_penalty=0.5, min_tokens=1),
    ]

    def controls() -> list[RowControls | None]:
        rows = [RowControls(p, [1, 2], {0}) if p.shapes_logits else None for p in params]
        for row in rows:
            if row is not None:
                row.record(2)
        return rows

    gens = [make_generator(p.seed) for p in params]
    together = [d() for d in row_draws(logits, params, gens, controls())]
    alone = []
    for row, (p, c) in enumerate(zip(params, controls(), strict=True)):
        alone.append(row_draws(logits[row : row + 1], [p], [make_generator(p.seed)], [c])[0]())
    assert together == alone
    assert together[0] == (int(np.argmax(logits[0].numpy())), None)


def test_controls_ignore_ids_beyond_the_logits_row():
    """A tokenizer may know more ids than the model's head; such ids are skipped, not an
    IndexError."""
    logits = random_logits(1)[0]
    params = SamplingParams(
        8,
        0.0,
        logit_bias=((VOCAB + 3, 100.0),),
        repetition_penalty=1.2,
        presence_penalty=0.5,
        min_tokens=1,
    )
    controls = RowControls(params, [VOCAB + 1, 1], {VOCAB + 2})
    controls.record(VOCAB + 5)
    assert controls.shape(logits).shape == logits.shape


@pytest.mark.parametrize("k", [1, 5, 20])
def test_top_ids_are_torch_topk_at_vocabulary_size(k):
    from server.engine.sampler import top_ids

    generator = torch.Generator().manual_seed(k)
    for scale in (0.01, 3.0, 30.0):
        row = torch.randn(49152, generator=generator) * scale
        row[:100] = float("-inf")  # masked tokens
        assert top_ids(row.numpy(), k) == torch.topk(row, k).indices.tolist()
    ties = torch.zeros(49152)
    ties[[7, 3, 40000]] = 1.0
    assert top_ids(ties.numpy(), 3) == [3, 7, 40000]
    assert top_ids(ties.numpy(), 5) == [3, 7, 40000, 0, 1]


@pytest.mark.parametrize(("rows", "vocab"), [(1, 50), (3, 63), (17, 49152), (2, 262144)])
def test_the_greedy_pass_is_numpys_argmax_and_finds_every_non_finite_row(rows, vocab):
    """One pass of csrc/argmax_rows.cpp (where the kernels build) gives numpy's argmax (the
    first maximal index: ties at the front, in the middle and in the tail past the vector
    lanes) and flags rows with a NaN, an infinity or only -inf."""
    from server.engine.sampler import greedy_and_finite

    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(rows)) * 3
    top = logits[0].max() + 1
    logits[0, [vocab // 3, vocab // 2, vocab - 1]] = top  # a tie: the first wins
    if rows > 1:
        logits[1, vocab - 1] = logits[1].max() + 1  # the largest in the tail
    if rows > 2:
        logits[2, 7] = float("nan")
    if rows > 16:
        logits[16] = float("-inf")
        logits[15, 3] = float("inf")
    greedy, finite = greedy_and_finite(logits.contiguous())
    assert finite == torch.isfinite(logits.sum(dim=-1)).tolist()
    expected = logits.numpy().argmax(-1).tolist()
    assert [g for g, f in zip(greedy, finite, strict=True) if f] == [
        e for e, f in zip(expected, finite, strict=True) if f
    ]
    assert greedy[0] == vocab // 3
