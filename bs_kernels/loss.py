"""Public API: bs_token_loss, forget_logprobs and the BSTokenLoss module.

Layering (shared/CONVENTIONS.md): validate arguments here, pick the backend, flatten to rows [N, V] (a view where
the strides allow it), call the backend through the autograd Function (or the reference), reduce outside autograd.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from . import _options as opts
from ._rows import reduce_token_values
from .autograd import backend_rows
from .backends import get_backend, resolve_impl
from .backends.contract import RowOutputs
from .reference import reference_rows


class BSTokenStats(NamedTuple):
    """Per (shifted) position statistics of one pass; shapes follow the (shifted) labels, plus k for beliefs."""

    token_logprobs: torch.Tensor  # [...]    log p(label), 0 where ignored
    belief_ids: torch.Tensor  # [..., k] int64, the k most likely ids (any order)
    belief_probs: torch.Tensor  # [..., k] q: their probabilities renormalised over the k (with the temperature)


def _check_label_shape(inputs: torch.Tensor, labels: torch.Tensor, *, shift: bool, name: str = "logits") -> None:
    """labels must match ``inputs`` ([B, T, last] with labels [B, T] when shift=True) and live on its device."""
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


def _row_labels(labels: torch.Tensor, *, shift: bool, ignore_index: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """int64 labels [N] (-1 = ignored), one per row of the flattened inputs, and the (shifted) output shape.

    With shift=True, inputs[:, t] predicts labels[:, t + 1]. Instead of slicing the inputs (inputs[:, :-1] cannot be
    flattened to rows without a copy) the labels move left by one and the last position is ignored, so the rows are
    a free view of the inputs; the extra column is dropped from the per-position outputs afterwards (_unflatten).
    """
    rows_labels = opts.normalize_labels(labels, ignore_index)
    if shift:
        out_shape = (labels.shape[0], labels.shape[1] - 1)
        rows_labels = torch.cat([rows_labels[:, 1:], torch.full_like(rows_labels[:, :1], -1)], dim=1)
    else:
        out_shape = tuple(labels.shape)
    return rows_labels.reshape(-1), out_shape


def _shifted_rows(
    logits: torch.Tensor, labels: torch.Tensor, *, shift: bool, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """Rows [N, V] (a view of the logits where the strides allow it) and int64 labels [N] (-1 = ignored), plus the
    output shape (the shifted labels' shape); see _row_labels for how shift=True avoids copying the logits.
    """
    opts.check_logits_dtype(logits)
    opts.check_labels_dtype(labels)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty last (vocabulary) dimension, got shape {tuple(logits.shape)}")
    vocab_size = logits.shape[-1]
    _check_label_shape(logits, labels, shift=shift)
    opts.check_label_range(labels, vocab_size, ignore_index)
    rows_labels, out_shape = _row_labels(labels, shift=shift, ignore_index=ignore_index)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return logits.reshape(-1, vocab_size), rows_labels, out_shape


def _unflatten(values: torch.Tensor, batch_shape: tuple[int, ...], shift: bool) -> torch.Tensor:
    """Rows back to the labels' shape; with shift=True drop the padded last position."""
    if shift:
        batch, length = batch_shape[0], batch_shape[1] + 1
        return values.reshape(batch, length, *values.shape[1:])[:, :-1]
    return values.reshape(*batch_shape, *values.shape[1:])


def _compute_rows(
    rows: torch.Tensor,
    rows_labels: torch.Tensor,
    impl: str,
    *,
    lam: float,
    top_k: int,
    belief_temperature: float,
    detach_belief: bool,
    inplace_backward: bool,
) -> RowOutputs:
    name = resolve_impl(impl, rows.device)
    if name == "reference":
        return reference_rows(
            rows,
            rows_labels,
            lam=lam,
            top_k=top_k,
            belief_temperature=belief_temperature,
            detach_belief=detach_belief,
        )
    return backend_rows(
        get_backend(name, rows.device),
        rows,
        rows_labels,
        lam=lam,
        top_k=min(top_k, rows.shape[-1]),
        belief_temperature=belief_temperature,
        detach_belief=detach_belief,
        inplace_backward=inplace_backward,
    )


def bs_token_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    lam: float = 0.2,
    top_k: int = 20,
    ignore_index: int = opts.IGNORE_INDEX,
    shift: bool = True,
    reduction: str = "sequence_mean",
    detach_belief: bool = True,
    belief_temperature: float = 1.0,
    impl: str = "auto",
    return_stats: bool = False,
    inplace_backward: bool = False,
):
    """The BS-T forget objective L_BST = <t, log pi> (<= 0), to be minimised (gradient ascent on the soft target).

    Args:
        logits: [B, T, V] from a causal LM (shift=True), or [..., V] with labels [...] (shift=False), any floating
            dtype; statistics are computed in float32 (float64 for float64 input).
        labels: [B, T] (or [...]) integer ids, ``ignore_index`` where a position does not count.
        lam: weight of the model's top-k belief q in the target t = lam * q + (1 - lam) * one_hot(label).
        top_k: number of beliefs per position (all of the vocabulary when top_k >= V).
        shift: pair logits[:, t] with labels[:, t + 1] (Hugging Face causal-LM labels).
        reduction: "sequence_mean" (per-sequence mean, then mean over sequences with a valid position),
            "token_mean", "sum" or "none" (per position, shape of the shifted labels).
        detach_belief: stop the gradient through q (the paper's choice).
        belief_temperature: q = softmax over the top k of z / belief_temperature.
        impl: "auto", "reference", "torch", "native" or "triton".
        return_stats: also return a BSTokenStats with per-position log p(label), belief ids and belief probs.
        inplace_backward: let the backward write the gradient into the logits' storage (saves one [N, V] buffer;
            the logits are overwritten, so only use it when nothing else needs them).

    Returns:
        The reduced loss (float32, float64 for float64 logits), and the stats when ``return_stats``.
    """
    opts.check_loss_options(
        lam=lam,
        top_k=top_k,
        belief_temperature=belief_temperature,
        detach_belief=detach_belief,
        ignore_index=ignore_index,
        reduction=reduction,
        impl=impl,
    )
    if not shift and reduction == "sequence_mean" and labels.dim() < 2:
        raise ValueError(
            'reduction="sequence_mean" needs labels with a sequence dimension [B, T]; with flat labels [N] use '
            '"token_mean", "sum" or "none"'
        )
    rows, rows_labels, out_shape = _shifted_rows(logits, labels, shift=shift, ignore_index=ignore_index)
    outputs = _compute_rows(
        rows,
        rows_labels,
        impl,
        lam=float(lam),
        top_k=top_k,
        belief_temperature=float(belief_temperature),
        detach_belief=detach_belief,
        inplace_backward=inplace_backward,
    )
    values = _unflatten(outputs.row_loss, out_shape, shift)
    valid = _unflatten(rows_labels >= 0, out_shape, shift)
    loss = reduce_token_values(values, valid, reduction)
    if not return_stats:
        return loss
    stats = BSTokenStats(
        token_logprobs=_unflatten(outputs.token_logprobs, out_shape, shift),
        belief_ids=_unflatten(outputs.belief_ids, out_shape, shift),
        belief_probs=_unflatten(outputs.belief_probs, out_shape, shift),
    )
    return loss, stats


def forget_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = opts.IGNORE_INDEX,
    shift: bool = True,
    impl: str = "auto",
) -> torch.Tensor:
    """Per-token log p(label) (float32; float64 for float64 logits), 0 where ignored; differentiable (e_y - pi).

    Shape: that of the (shifted) labels. The building block of GA, NPO and the evaluation metrics.
    """
    opts.check_ignore_index(ignore_index)
    opts.check_impl(impl)
    rows, rows_labels, out_shape = _shifted_rows(logits, labels, shift=shift, ignore_index=ignore_index)
    outputs = _compute_rows(
        rows, rows_labels, impl, lam=0.0, top_k=0, belief_temperature=1.0, detach_belief=True, inplace_backward=False
    )
    return _unflatten(outputs.row_loss, out_shape, shift)


class BSTokenLoss(nn.Module):
    """Module form of :func:`bs_token_loss`; stores the options, ``forward(logits, labels)`` returns the loss."""

    def __init__(
        self,
        *,
        lam: float = 0.2,
        top_k: int = 20,
        ignore_index: int = opts.IGNORE_INDEX,
        shift: bool = True,
        reduction: str = "sequence_mean",
        detach_belief: bool = True,
        belief_temperature: float = 1.0,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        opts.check_loss_options(
            lam=lam,
            top_k=top_k,
            belief_temperature=belief_temperature,
            detach_belief=detach_belief,
            ignore_index=ignore_index,
            reduction=reduction,
            impl=impl,
        )
        self.lam = lam
        self.top_k = top_k
        self.ignore_index = ignore_index
        self.shift = shift
        self.reduction = reduction
        self.detach_belief = detach_belief
        self.belief_temperature = belief_temperature
        self.impl = impl

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return bs_token_loss(
            logits,
            labels,
            lam=self.lam,
            top_k=self.top_k,
            ignore_index=self.ignore_index,
            shift=self.shift,
            reduction=self.reduction,
            detach_belief=self.detach_belief,
            belief_temperature=self.belief_temperature,
            impl=self.impl,
        )

    def extra_repr(self) -> str:
        return (
            f"lam={self.lam}, top_k={self.top_k}, reduction={self.reduction!r}, "
            f"detach_belief={self.detach_belief}, impl={self.impl!r}"
        )
