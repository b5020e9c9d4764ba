"""A grammar row draws before it masks (engine/controls.py): the token kept is the one masking
first would give (greedy), and the tokens drawn follow the masked distribution (temperature);
rows with top-k/top-p mask first. The bundled model's tokenizer, a JSON schema's grammar."""

from __future__ import annotations

import json

import pytest
import torch

from ragtune.config import default_home
from ragtune.models import resolve_model_dir
from server.engine.controls import RowControls
from server.engine.grammar import GrammarCompiler, GrammarSpec, RowGrammar
from server.engine.sampler import make_generator, sample_batch, sample_row
from server.engine.types import SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string"}, "score": {"type": "integer"}},
    "required": ["answer", "score"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def grammar():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir("bundled", default_home()))
    vocab = len(tokenizer)
    compiler = GrammarCompiler(tokenizer, vocab, {tokenizer.eos_token_id})
    compiled = compiler.compile(GrammarSpec("json_schema", json.dumps(SCHEMA)))
    prefix = tokenizer.encode('{"answer": "The pallet is')
    return compiled, prefix, vocab


def _row_at(compiled, prefix: list[int], params: SamplingParams) -> RowControls:
    controls = RowControls(params, [], [], RowGrammar(compiled))
    for token in prefix:
        controls.grammar.accept(token)
    return controls


def _allowed(compiled, prefix: list[int], vocab: int) -> torch.Tensor:
    row = torch.zeros(vocab)
    _row_at(compiled, prefix, SamplingParams(max_tokens=16, temperature=0.0)).grammar.mask(row)
    return torch.isfinite(row)


@pytest.mark.parametrize("cut", [0, 1, 3, len('{"answer": "The pallet is')])
def test_greedy_keeps_the_masked_argmax(grammar, cut: int) -> None:
    compiled, prefix, vocab = grammar
    at = prefix[: min(cut, len(prefix))]
    allowed = _allowed(compiled, at, vocab)
    generator = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=16, temperature=0.0)
    refused = 0
    for _ in range(40):
        logits = torch.randn(vocab, generator=generator) * 4
        masked = logits.masked_fill(~allowed, float("-inf"))
        controls = _row_at(compiled, at, params)
        token = controls.choose(logits, lambda row: sample_row(row, params, None))
        assert token == int(masked.argmax())
        refused += not bool(allowed[int(logits.argmax())])
    assert refused > 0  # the unmasked argmax was refused at least once: both paths ran


def test_a_greedy_batch_keeps_each_rows_masked_argmax(grammar) -> None:
    """The batch path: a greedy row under a grammar alone keeps the batch's argmax when the
    grammar accepts it, else masks; a row with a logit bias too goes the shaped way."""
    compiled, _, vocab = grammar
    prefix: list[int] = []  # the start: only a `{` may come, so random argmaxes are refused
    allowed = _allowed(compiled, prefix, vocab)
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(8, vocab, generator=generator) * 4
    logits[::2, allowed.nonzero().flatten()[0]] = 50.0  # even rows: an allowed argmax
    plain = SamplingParams(max_tokens=16, temperature=0.0)
    biased = SamplingParams(max_tokens=16, temperature=0.0, logit_bias=((7, 1.0),))
    params = [plain] * 6 + [biased] * 2
    controls = [_row_at(compiled, prefix, p) for p in params]
    tokens = sample_batch(logits, params, [make_generator(0)] * 8, controls)
    for row, token in enumerate(tokens):
        shaped = logits[row].clone()
        shaped[7] += 1.0 if row >= 6 else 0.0
        assert token == int(shaped.masked_fill(~allowed, float("-inf")).argmax())
        assert controls[row].generated == 1
    assert not all(allowed[logits[row].argmax()] for row in range(8))  # both paths ran


def _frequencies(compiled, prefix, logits, params, draws: int) -> torch.Tensor:
    counts = torch.zeros(logits.shape[0])
    generator = make_generator(7)
    for _ in range(draws):
        controls = _row_at(compiled, prefix, params)
        counts[controls.choose(logits, lambda row: sample_row(row, params, generator))] += 1
    return counts / draws


def test_temperature_draws_follow_the_masked_distribution(grammar) -> None:
    compiled, prefix, vocab = grammar
    allowed = _allowed(compiled, prefix, vocab)
    ids = allowed.nonzero().flatten()[:3].tolist() + (~allowed).nonzero().flatten()[:3].tolist()
    logits = torch.full((vocab,), float("-inf"))
    # the refused tokens carry ~70 % of the mass: most first draws are refused
    logits[ids] = torch.tensor([0.0, 0.5, -0.5, 1.5, 1.2, 1.0])
    params = SamplingParams(max_tokens=16, temperature=0.8)
    observed = _frequencies(compiled, prefix, logits, params, draws=4000)
    expected = torch.softmax(logits.masked_fill(~allowed, float("-inf")) / 0.8, dim=-1)
    assert observed[~allowed].sum() == 0
    assert torch.allclose(observed[ids[:3]], expected[ids[:3]], atol=0.03)


def test_top_p_rows_mask_before_they_draw(grammar) -> None:
    """Allowed a1 (0.30), a2 (0.15) and 55 refused tokens of 0.01: the unmasked top-p 0.5 set
    holds a1, a2 and a few refused ones, so drawing first would keep a2 ~30 % of the time;
    masked first, a1 alone (0.67 of the allowed mass) fills the top-p set."""
    compiled, prefix, vocab = grammar
    allowed = _allowed(compiled, prefix, vocab)
    first, second = allowed.nonzero().flatten()[:2].tolist()
    logits = torch.full((vocab,), float("-inf"))
    logits[(~allowed).nonzero().flatten()[:55]] = torch.tensor(0.01).log()
    logits[first], logits[second] = torch.tensor(0.30).log(), torch.tensor(0.15).log()
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.5)
    observed = _frequencies(compiled, prefix, logits, params, draws=200)
    assert observed[first] == 1.0
