"""metrics.intervals against scipy's own computations on known data."""

from __future__ import annotations

import numpy as np
import pytest

stats = pytest.importorskip("scipy.stats")

from bs_unlearn.metrics.intervals import excludes_zero, paired_bootstrap, t_interval  # noqa: E402


def test_t_interval_matches_scipy():
    values = [0.31, 0.35, 0.29, 0.40]
    mean, low, high = t_interval(values)
    expected = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert mean == pytest.approx(np.mean(values), abs=1e-15)
    assert (low, high) == pytest.approx(expected, abs=1e-12)


def test_t_interval_of_one_seed_is_not_available():
    assert t_interval([0.5]) == (0.5, None, None)
    with pytest.raises(ValueError, match="non-empty"):
        t_interval([])


def test_paired_bootstrap_of_one_seed_matches_scipy_percentile_bootstrap():
    rng = np.random.default_rng(1)
    a = rng.normal(0.3, 0.2, size=200)
    b = a - rng.normal(0.05, 0.1, size=200)
    mean, low, high = paired_bootstrap(a, b, resamples=20000)
    reference = stats.bootstrap((a - b,), np.mean, method="percentile", n_resamples=20000, random_state=0)
    assert mean == pytest.approx(np.mean(a - b), abs=1e-15)
    width = reference.confidence_interval.high - reference.confidence_interval.low
    # Two Monte-Carlo estimates of the same percentiles: equal to a small fraction of the interval's width.
    assert low == pytest.approx(reference.confidence_interval.low, abs=0.03 * width)
    assert high == pytest.approx(reference.confidence_interval.high, abs=0.03 * width)


def test_paired_bootstrap_resamples_seeds_too():
    # Every question agrees within a seed, the seeds disagree: only resampling seeds gives the interval its width.
    a = np.array([[1.0] * 50, [0.0] * 50, [0.5] * 50])
    b = np.zeros_like(a)
    mean, low, high = paired_bootstrap(a, b)
    assert mean == pytest.approx(0.5) and low < 0.2 and high > 0.8
    assert paired_bootstrap(a + 0.25, a) == pytest.approx((0.25, 0.25, 0.25))


def test_paired_bootstrap_refuses_unpaired_inputs():
    with pytest.raises(ValueError, match="equal"):
        paired_bootstrap(np.zeros((2, 3)), np.zeros((2, 4)))


def test_excludes_zero():
    assert excludes_zero(0.1, 0.3) and excludes_zero(-0.3, -0.1)
    assert not excludes_zero(-0.1, 0.3) and not excludes_zero(None, None)
