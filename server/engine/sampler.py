"""Per-row token sampling inside one batched step: greedy, temperature, min-p, top-k and
nucleus (top-p), each row with its own seed, its own logits controls (engine/controls.py) and,
when it asks, the logprobs of the token it drew.

Plain greedy rows (no controls) are decided for the whole batch by one numpy argmax; only the
rows that use a feature pay for it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import numpy as np
import torch

from server.engine import native
from server.engine.controls import RowControls
from server.engine.types import SamplingParams, TokenLogprobs

Drawn = tuple[int, TokenLogprobs | None]


def make_generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator(device="cpu")
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """logits: [vocab] float32 on CPU (already shaped by the row's controls). vLLM's order:
    temperature, then min-p, then top-k, then top-p."""
    if params.greedy:  # numpy's argmax: vectorized, the first maximal index as torch's
        return int(logits.numpy().argmax())
    scaled = logits / params.temperature
    if params.min_p > 0.0:
        probs = torch.softmax(scaled, dim=-1)
        scaled = scaled.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    if 0 < params.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        sorted_probs[(cumulative - sorted_probs) > params.top_p] = 0.0
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> TokenLogprobs:
    """The model's own distribution (log-softmax of the raw [vocab] row, as vLLM's default
    `raw_logprobs`), computed on this row alone so batch neighbours cannot change it: one
    logsumexp, then only the chosen and the top-k entries (no [vocab] log-softmax, no
    torch.topk: 170 against 85 µs a row at 49k tokens). The logsumexp is numpy's: torch's
    splits one row's sum among the threads, so its bits followed the team's size (which
    engine/team_size.py changes: 9 of 200 rows differed at 1 and 2 threads); numpy sums the
    row on one thread, as fast (39 against 40 µs at 49k)."""
    values = logits.numpy()
    peak = float(values.max())
    lse = peak + math.log(float(np.exp(values - peak).sum(dtype=np.float32)))
    best = tuple((i, float(values[i]) - lse) for i in top_ids(values, top)) if top > 0 else ()
    return TokenLogprobs(token, float(values[token]) - lse, best)


_SAMPLE_STRIDE = 16


def top_ids(values: np.ndarray, k: int) -> list[int]:
    """Indices of the k largest values, largest first (ties: lower index first). The k-th
    largest of every 16th value bounds the k-th largest of all from below, so one pass keeps
    only the few candidates that can be in the top k."""
    if values.shape[0] < 4 * _SAMPLE_STRIDE * k:
        return np.argsort(-values, kind="stable")[:k].tolist()
    threshold = np.partition(values[::_SAMPLE_STRIDE], -k)[-k]
    candidates = np.flatnonzero(values >= threshold)
    return candidates[np.argsort(-values[candidates], kind="stable")[:k]].tolist()


class NonFiniteLogitsError(ValueError):
    """The model produced NaN or Inf for this row (e.g. an adapter whose scale overflows the
    activations); any token drawn from it would be garbage."""


def _refuse() -> Drawn:
    raise NonFiniteLogitsError("non-finite logits")


def _argmax(token: int) -> Drawn:
    return token, None


def _argmax_with_logprobs(token: int, logits: torch.Tensor, top: int) -> Drawn:
    return token, token_logprobs(logits, token, top)


def _draw(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator,
    controls: RowControls | None,
) -> Drawn:
    if controls is None:
        token = sample_row(logits, params, generator)
    else:
        token = controls.choose(logits, lambda row: sample_row(row, params, generator))
    if params.logprobs is None:
        return token, None
    return token, token_logprobs(logits, token, params.logprobs)


def _greedy_first(
    token: int,
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator,
    controls: RowControls,
) -> Drawn:
    """A greedy row under a grammar and nothing else keeps the batch's argmax when the
    grammar accepts it (no row copy, no mask, no second argmax: controls.py), else draws
    as any controlled row."""
    if not controls.try_keep(token):
        return _draw(logits, params, generator, controls)
    if params.logprobs is None:
        return token, None
    return token, token_logprobs(logits, token, params.logprobs)


def greedy_and_finite(logits: torch.Tensor) -> tuple[list[int], list[bool]]:
    """Each row's first maximal index (numpy's and torch's rule) and whether its sum is
    finite (NaN/Inf anywhere makes it not; a finite row whose sum overflows float32, logits
    near 1e34, is garbage too). logits: [batch, vocab] float32, contiguous, on the CPU. One
    pass of ragtune's kernel (csrc/argmax_rows.cpp, rows split between the threads: 16 rows
    of Gemma 3's 262k vocabulary ~0.5 -> ~0.15 ms), else numpy's argmax (vectorized; torch's
    CPU argmax is not: 34 against 217 µs at 16 x 49152) and one sum a row."""
    rows, vocab = logits.shape
    if native.unavailable_reason() is None:
        index = torch.empty(rows, dtype=torch.int64)
        finite = torch.empty(rows, dtype=torch.int32)
        native.library().argmax_rows(
            logits.data_ptr(), rows, vocab, index.data_ptr(), finite.data_ptr(),
            torch.get_num_threads(),
        )  # fmt: skip
        return index.tolist(), [bool(f) for f in finite.tolist()]
    return logits.numpy().argmax(-1).tolist(), torch.isfinite(logits.sum(dim=-1)).tolist()


def row_draws(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator],
    controls: list[RowControls | None] | None = None,
) -> list[Callable[[], Drawn]]:
    """logits: [batch, vocab]. One zero-argument draw per row returning (token, logprobs or
    None), so the caller takes each row's token on its own and a draw that fails fails only
    its row. Plain greedy rows are decided here, in one host transfer; a row with NaN/Inf
    logits fails instead of yielding a token."""
    logits = logits.float().cpu().contiguous()
    greedy, finite = greedy_and_finite(logits)
    rows = controls or [None] * len(params)

    def draw(
        row: int, p: SamplingParams, generator: torch.Generator, control: RowControls | None
    ) -> Callable[[], Drawn]:
        if not finite[row]:
            return _refuse
        if p.greedy and control is None:
            if p.logprobs is None:
                return partial(_argmax, greedy[row])
            return partial(_argmax_with_logprobs, greedy[row], logits[row], p.logprobs)
        if p.greedy and not p.shapes_logits:  # a grammar alone: try the batch's argmax
            return partial(_greedy_first, greedy[row], logits[row], p, generator, control)
        return partial(_draw, logits[row], p, generator, control)

    return [draw(row, *args) for row, args in enumerate(zip(params, generators, rows, strict=True))]


def sample_batch(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator],
    controls: list[RowControls | None] | None = None,
) -> list[int]:
    """logits: [batch, vocab] -> one token per row."""
    return [draw()[0] for draw in row_draws(logits, params, generators, controls)]
