"""Uncertainty for small benchmarks: bootstrap confidence intervals and paired tests.

Every function takes a seed and uses its own `numpy.random.Generator`, so the same inputs
and seed give the same intervals and p-values on every run. Missing values (None: metric
not applicable to that question) are dropped; paired tests keep only questions scored in
both arms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

DEFAULT_RESAMPLES = 2000


@dataclass(frozen=True)
class Estimate:
    """A mean with its percentile-bootstrap interval; `n` values were not None."""

    mean: float | None
    low: float | None
    high: float | None
    n: int

    def to_dict(self) -> dict[str, float | int | None]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class PairedTest:
    """Arm B minus arm A on the same questions: mean difference, its bootstrap interval, and
    a two-sided paired permutation (sign-flip) p-value."""

    diff: float | None
    low: float | None
    high: float | None
    p_value: float | None
    n: int

    def to_dict(self) -> dict[str, float | int | None]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _present(values: Sequence[float | None]) -> np.ndarray:
    return np.asarray([v for v in values if v is not None], dtype=np.float64)


def _bootstrap_means(values: np.ndarray, rng: np.random.Generator, resamples: int) -> np.ndarray:
    """Means of `resamples` resamples with replacement, drawn in blocks to bound memory."""
    means = np.empty(resamples)
    block = max(1, 2_000_000 // max(len(values), 1))
    for start in range(0, resamples, block):
        stop = min(resamples, start + block)
        picks = rng.integers(0, len(values), size=(stop - start, len(values)))
        means[start:stop] = values[picks].mean(axis=1)
    return means


def bootstrap_ci(
    values: Sequence[float | None],
    seed: int = 0,
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = 0.95,
) -> Estimate:
    """Mean and percentile bootstrap interval of the mean."""
    data = _present(values)
    if data.size == 0:
        return Estimate(None, None, None, 0)
    mean = float(data.mean())
    if data.size == 1 or np.all(data == data[0]):
        return Estimate(mean, mean, mean, int(data.size))
    means = _bootstrap_means(data, np.random.default_rng(seed), resamples)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Estimate(mean, float(low), float(high), int(data.size))


def paired_test(
    a: Sequence[float | None],
    b: Sequence[float | None],
    seed: int = 0,
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = 0.95,
) -> PairedTest:
    """Compare two arms question by question (`a[i]` and `b[i]` score the same question).

    The p-value flips the sign of each per-question difference at random (the null: the
    arms are exchangeable) and counts how often the mean difference is at least as far from
    zero as observed, with the +1 correction so it is never exactly 0.
    """
    if len(a) != len(b):
        raise ValueError(f"paired scores differ in length: {len(a)} vs {len(b)}")
    pairs = [(x, y) for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    if not pairs:
        return PairedTest(None, None, None, None, 0)
    diffs = np.asarray([y - x for x, y in pairs], dtype=np.float64)
    observed = float(diffs.mean())
    if np.all(diffs == 0):
        return PairedTest(0.0, 0.0, 0.0, 1.0, len(diffs))
    rng = np.random.default_rng(seed)
    means = _bootstrap_means(diffs, rng, resamples)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    extreme = 0
    block = max(1, 2_000_000 // len(diffs))
    for start in range(0, resamples, block):
        stop = min(resamples, start + block)
        signs = rng.choice(np.array([-1.0, 1.0]), size=(stop - start, len(diffs)))
        flipped = np.abs((signs * diffs).mean(axis=1))
        extreme += int(np.sum(flipped >= abs(observed) - 1e-12))
    p_value = (extreme + 1) / (resamples + 1)
    return PairedTest(observed, float(low), float(high), p_value, len(diffs))


def percentile(values: Sequence[float | None], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), None for no values."""
    data = _present(values)
    return float(np.percentile(data, q)) if data.size else None


def mean(values: Sequence[float | None]) -> float | None:
    data = _present(values)
    return float(data.mean()) if data.size else None


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm-Bonferroni adjusted p-values (None stays None), for many arm pairs at once."""
    indexed = sorted((p, i) for i, p in enumerate(p_values) if p is not None and not math.isnan(p))
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    m = len(indexed)
    for rank, (p, i) in enumerate(indexed):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted
