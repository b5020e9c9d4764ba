"""Per-row token sampling: greedy, temperature and nucleus (top-p), each row with its own seed."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from server.engine.types import SamplingParams


def make_generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator(device="cpu")
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """logits: [vocab] float32 on CPU."""
    if params.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        sorted_probs[(cumulative - sorted_probs) > params.top_p] = 0.0
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


class NonFiniteLogitsError(ValueError):
    """The model produced NaN or Inf for this row (e.g. an adapter whose scale overflows the
    activations); any token drawn from it would be garbage."""


def _refuse() -> int:
    raise NonFiniteLogitsError("non-finite logits")


def row_draws(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]
) -> list[Callable[[], int]]:
    """logits: [batch, vocab]. One zero-argument draw per row, so the caller takes each row's
    token on its own and a draw that fails fails only its row. Greedy rows are decided here,
    in one host transfer; a row with NaN/Inf logits fails instead of yielding a token."""
    logits = logits.float().cpu().contiguous()
    # numpy's argmax is vectorized, torch's CPU argmax is not (34 against 217 µs at 16 x
    # 49152); both return the first maximal index
    greedy = logits.numpy().argmax(-1).tolist()
    # NaN/Inf anywhere in a row makes its sum non-finite: one reduction instead of a
    # [batch, vocab] mask (0.02 vs 0.59 ms at 16 rows); a finite row whose sum overflows
    # float32 (logits near 1e34) is garbage too
    finite = torch.isfinite(logits.sum(dim=-1)).tolist()

    def draw(row: int, p: SamplingParams, generator: torch.Generator) -> Callable[[], int]:
        if not finite[row]:
            return _refuse
        if p.greedy:
            return partial(int, greedy[row])
        return partial(sample_row, logits[row], p, generator)

    return [draw(row, *pair) for row, pair in enumerate(zip(params, generators, strict=True))]


def sample_batch(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]
) -> list[int]:
    """logits: [batch, vocab] -> one token per row."""
    return [draw() for draw in row_draws(logits, params, generators)]
