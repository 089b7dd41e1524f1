"""Row plumbing shared by the logits and the linear entry points: tensor checks, shift, flatten, unflatten, reduce.

Every entry point turns its inputs into rows ([N, V] logits or [N, H] hidden states) with one int64 label per row
(-1 = ignored), runs a backend on the rows, and turns the per-row values back into the (shifted) labels' shape
(:class:`RowLayout`) before reducing them with :func:`reduce_token_values`.

Shift without a copy: with shift=True, inputs[:, t] predicts labels[:, t + 1]. Instead of slicing the inputs
(inputs[:, :-1] cannot be flattened to rows without a copy) the labels move left by one and the last position is
ignored, so the rows are a free view of the inputs; the extra column is dropped again by RowLayout.unflatten.
"""

from __future__ import annotations

import sys
from typing import NamedTuple

import torch

from . import _options as opts


class RowLayout(NamedTuple):
    """How the per-row outputs ([N, ...], N = B * T rows) map back to the (shifted) labels' shape."""

    shape: tuple[int, ...]  # the (shifted) labels' shape: [B, T - 1] for shift=True, labels.shape otherwise
    shift: bool

    def unflatten(self, values: torch.Tensor) -> torch.Tensor:
        """[N, ...] rows -> [*shape, ...]; with shift=True the padded last position of each sequence is dropped."""
        if self.shift:
            batch, length = self.shape[0], self.shape[1] + 1
            return values.reshape(batch, length, *values.shape[1:])[:, :-1]
        return values.reshape((*self.shape, *values.shape[1:]))  # a tuple: shape () (1-D logits) is valid too


def is_dtensor(value: object) -> bool:
    """Whether ``value`` is a torch.distributed DTensor (cheap: no DTensor exists before its module is imported)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(value, module.DTensor)


def check_floating(tensor: object, name: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor (float32, bfloat16, float16, float64), got {tensor.dtype}")


def check_labels(inputs: torch.Tensor, labels: object, *, shift: bool, name: str) -> None:
    """labels must be an integer tensor matching ``inputs`` ([B, T, last] with labels [B, T] when shift=True) and
    live on its device."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if shift:
        if inputs.dim() != 3 or labels.dim() != 2 or labels.shape != inputs.shape[:2]:
            last = "V" if name == "logits" else "H"
            raise ValueError(
                f"with shift=True, {name} must be [B, T, {last}] and labels [B, T]; got {name} "
                f"{tuple(inputs.shape)} and labels {tuple(labels.shape)}"
            )
    elif labels.shape != inputs.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal {name} shape without its last dimension "
            f"{tuple(inputs.shape[:-1])}"
        )
    if labels.device != inputs.device:
        raise ValueError(f"labels are on {labels.device} but {name} are on {inputs.device}")


def check_label_range(labels: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Labels must be ignore_index or a vocabulary id; anything else would index out of bounds in a kernel.

    Eager: a ValueError naming the first bad label. Under torch.compile reading a value on the host would break the
    graph, so the same condition is an asynchronous assertion in the graph: a RuntimeError with the same text but
    without the value, raised when the compiled code runs. Meta tensors hold no values: nothing to check.
    """
    if labels.device.type == "meta":
        return
    counted = labels != ignore_index
    out_of_range = counted & ((labels < 0) | (labels >= vocab_size))
    if torch.compiler.is_compiling():
        torch._assert_async(
            ~out_of_range.any(),
            f"labels contains a value outside [0, {vocab_size}) that is not ignore_index={ignore_index}",
        )
        return
    if bool(out_of_range.any()):
        bad = int(labels[out_of_range][0])
        raise ValueError(
            f"labels contains {bad}, which is outside [0, {vocab_size}) and is not ignore_index={ignore_index}"
        )


def check_sequence_reduction(labels: object, *, shift: bool, reduction: str) -> None:
    """reduction="sequence_mean" needs a sequence dimension; flat labels [N] (shift=False) have none."""
    if not shift and reduction == "sequence_mean" and isinstance(labels, torch.Tensor) and labels.dim() < 2:
        raise ValueError(
            'reduction="sequence_mean" needs labels with a sequence dimension [B, T]; with flat labels [N] use '
            '"token_mean", "sum" or "none"'
        )


def row_labels(labels: torch.Tensor, *, shift: bool, ignore_index: int) -> tuple[torch.Tensor, RowLayout]:
    """int64 labels [N] (-1 = ignored), one per row of the flattened inputs, and the layout of the outputs."""
    rows_labels = labels.to(torch.int64)
    rows_labels = torch.where(rows_labels == ignore_index, torch.full_like(rows_labels, -1), rows_labels)
    if shift:
        shape = (labels.shape[0], labels.shape[1] - 1)
        rows_labels = torch.cat([rows_labels[:, 1:], torch.full_like(rows_labels[:, :1], -1)], dim=1)
    else:
        shape = tuple(labels.shape)
    return rows_labels.reshape(-1), RowLayout(shape, shift)


def logits_rows(
    logits: torch.Tensor, labels: torch.Tensor, *, shift: bool, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, RowLayout]:
    """Checked rows [N, V] (a view of the logits where the strides allow it), labels [N] and the output layout."""
    check_floating(logits, "logits")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty last (vocabulary) dimension, got shape {tuple(logits.shape)}")
    check_labels(logits, labels, shift=shift, name="logits")
    vocab_size = logits.shape[-1]
    check_label_range(labels, vocab_size, ignore_index)
    rows_labels, layout = row_labels(labels, shift=shift, ignore_index=ignore_index)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return logits.reshape(-1, vocab_size), rows_labels, layout


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


def reduce_rows(row_values: torch.Tensor, rows_labels: torch.Tensor, layout: RowLayout, reduction: str):
    """reduce_token_values of per-row values [N], with the rows' own labels [N] (-1 = ignored) saying what counts."""
    return reduce_token_values(layout.unflatten(row_values), layout.unflatten(rows_labels >= 0), reduction)
