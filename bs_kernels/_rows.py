"""Row plumbing shared by the logits and the linear entry points: label checks, shift, flatten, unflatten, reduce.

Every entry point turns its inputs into rows ([N, V] logits or [N, H] hidden states) with one int64 label per row
(-1 = ignored), runs a backend on the rows, and turns the per-row values back into the (shifted) labels' shape
before reducing them with :func:`reduce_token_values`.
"""

from __future__ import annotations

import torch

from . import _options as opts


def reduce_token_values(values: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce per-position values over the valid positions; the one reduction every BS-T entry point uses.

    Args:
        values: [B, T'] (or [..., T']) per-position values, any floating dtype; whatever they hold where ``valid``
            is False (0, NaN, inf) is ignored, in value and in gradient.
        valid: bool tensor of the same shape, True where a position counts.
        reduction: "sequence_mean": the mean over each sequence's (last dimension's) valid positions, then the mean
            over the sequences that have at least one; "token_mean": sum over the valid positions / their number;
            "sum": sum over the valid positions; "none": ``values`` where valid, else 0 (same shape).

    Returns:
        A scalar (a [B, T'] tensor for "none") in the values' dtype. A batch with no valid position gives 0 with
        zero gradient, never NaN. Differentiable w.r.t. ``values``.
    """
    opts.check_reduction(reduction)
    if not isinstance(values, torch.Tensor) or not values.dtype.is_floating_point:
        raise TypeError(f"values must be a floating torch.Tensor, got {getattr(values, 'dtype', type(values))}")
    if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool:
        raise TypeError(f"valid must be a bool torch.Tensor, got {getattr(valid, 'dtype', type(valid))}")
    if valid.shape != values.shape:
        raise ValueError(f"valid shape {tuple(valid.shape)} must equal values shape {tuple(values.shape)}")
    values = torch.where(valid, values, torch.zeros((), dtype=values.dtype, device=values.device))
    if reduction == "none":
        return values
    if reduction == "sum":
        return values.sum()
    if reduction == "token_mean":
        return values.sum() / valid.sum().clamp(min=1)
    per_sequence_count = valid.sum(-1)
    per_sequence_mean = values.sum(-1) / per_sequence_count.clamp(min=1)
    return per_sequence_mean.sum() / (per_sequence_count > 0).sum().clamp(min=1)
