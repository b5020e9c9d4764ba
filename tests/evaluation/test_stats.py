"""Bootstrap intervals and the paired test: shape, determinism and known answers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from evaluation import stats


def test_bootstrap_shape_and_determinism() -> None:
    values = [0.0, 1.0] * 50
    first = stats.bootstrap_ci(values, seed=7, resamples=500)
    again = stats.bootstrap_ci(values, seed=7, resamples=500)
    other = stats.bootstrap_ci(values, seed=8, resamples=500)
    assert first == again
    assert first != other
    assert set(first.to_dict()) == {"mean", "low", "high", "n"}
    assert first.n == 100 and first.mean == 0.5
    assert first.low <= first.mean <= first.high
    # binomial standard error 0.05: the 95% interval is about 0.5 +- 0.098
    assert 0.37 < first.low < 0.43 and 0.57 < first.high < 0.63


def test_bootstrap_edge_cases() -> None:
    assert stats.bootstrap_ci([]) == stats.Estimate(None, None, None, 0)
    assert stats.bootstrap_ci([None, None]).n == 0
    assert stats.bootstrap_ci([0.3, None, 0.3]) == stats.Estimate(0.3, 0.3, 0.3, 2)
    assert stats.bootstrap_ci([2.0]) == stats.Estimate(2.0, 2.0, 2.0, 1)


def test_paired_test_no_difference() -> None:
    result = stats.paired_test([1, 0, 1], [1, 0, 1], seed=0)
    assert (result.diff, result.p_value, result.n) == (0.0, 1.0, 3)


def test_paired_test_clear_difference() -> None:
    result = stats.paired_test([0.0] * 30, [1.0] * 30, seed=0, resamples=999)
    assert result.diff == 1.0 and result.low == 1.0 and result.high == 1.0
    assert result.p_value == pytest.approx(1 / 1000)  # only the +1 correction


def test_paired_test_matches_exact_permutation_distribution() -> None:
    diffs = np.array([1.0, 1.0, 1.0, -1.0, 0.5, 1.0])
    observed = abs(diffs.mean())
    signs = itertools.product((-1, 1), repeat=len(diffs))
    flips = [abs((np.array(sign) * diffs).mean()) for sign in signs]
    exact = sum(f >= observed - 1e-12 for f in flips) / len(flips)
    result = stats.paired_test([0.0] * 6, diffs.tolist(), seed=3, resamples=20000)
    assert result.p_value == pytest.approx(exact, abs=0.01)


def test_paired_test_drops_unpaired_and_is_deterministic() -> None:
    a = [0.1, None, 0.5, 0.7, 0.2, 0.9]
    b = [0.3, 0.4, None, 0.6, 0.6, 0.8]
    first = stats.paired_test(a, b, seed=1, resamples=300)
    assert first.n == 4
    assert first.diff == pytest.approx(np.mean([0.2, -0.1, 0.4, -0.1]))
    assert first == stats.paired_test(a, b, seed=1, resamples=300)
    assert first.low <= first.diff <= first.high
    with pytest.raises(ValueError, match="length"):
        stats.paired_test([1.0], [1.0, 2.0])


def test_holm_adjustment() -> None:
    # sorted 0.01, 0.03, 0.04 -> 3*0.01, 2*0.03, max(0.06, 1*0.04): monotone
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([None, 0.5]) == [None, 0.5]


def test_percentile() -> None:
    assert stats.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert stats.percentile([None], 95) is None
