"""The one compute-dtype rule, below every other module: the reference, the backends and the epilogue import it."""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of every statistic, the returned loss and the arithmetic behind them (docs/math.md): float32
    whatever the input dtype, float64 for float64 input."""
    return torch.float64 if dtype == torch.float64 else torch.float32
