"""Intervals for comparisons over seeds: a method's mean over seeds with its 95 % t interval, and the paired
difference of two methods with a bootstrap interval over questions and seeds (docs/tofu.md, "Seeds and intervals").

    t_interval([0.31, 0.35, 0.29])                     -> (mean, low, high); low = high = None below 2 values
    paired_bootstrap(a, b)                             a, b: seeds x questions, the same questions at the same seeds
                                                       -> (mean of a - b, low, high)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float | None, float | None]:
    """Mean of ``values`` and its two-sided Student-t interval (n - 1 degrees of freedom); with fewer than two values
    the interval is (None, None): one seed says nothing about the spread."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"t_interval needs a non-empty list of numbers, got shape {x.shape}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    mean = float(x.mean())
    if x.size < 2:
        return mean, None, None
    from scipy import stats

    half = float(stats.t.ppf(0.5 + confidence / 2, x.size - 1) * x.std(ddof=1) / np.sqrt(x.size))
    return mean, mean - half, mean + half


def paired_bootstrap(
    a, b, *, confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of the paired differences ``a - b`` (arrays of seeds x questions: the same question at the same seed in
    both) and its percentile bootstrap interval. Each resample draws seeds with replacement and, independently,
    questions with replacement (the same questions for every seed, keeping the pairing), and takes the mean
    difference over the drawn seeds x questions: the interval holds the noise of both the seeds and the questions."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim == 1:
        a, b = a[None, :], b[None, :]
    if a.shape != b.shape or a.ndim != 2 or a.size == 0:
        raise ValueError(f"paired_bootstrap needs two equal seeds x questions arrays, got {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("paired_bootstrap: the values must be finite")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    diff = a - b
    n_seeds, n_questions = diff.shape
    rng = np.random.default_rng(seed)
    seed_draws = rng.integers(0, n_seeds, size=(resamples, n_seeds))
    question_draws = rng.integers(0, n_questions, size=(resamples, n_questions))
    # Mean over the drawn seeds x questions = mean over drawn seeds of (mean over drawn questions of that seed's row).
    means = np.array([diff[s][:, q].mean() for s, q in zip(seed_draws, question_draws)])
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(diff.mean()), float(low), float(high)


def excludes_zero(low: float | None, high: float | None) -> bool:
    """Whether an interval lies wholly on one side of zero (the difference is outside the noise)."""
    return low is not None and high is not None and (low > 0 or high < 0)
