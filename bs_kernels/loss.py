"""Public API: bs_token_loss, forget_logprobs and the BSTokenLoss module.

Layering (CONTRIBUTING.md): validate arguments here, pick the backend, flatten to rows [N, V] (a view where
the strides allow it), call the backend through the autograd Function (or the reference), reduce outside autograd.
"""

from __future__ import annotations

import torch
from torch import nn

from . import _options as opts
from . import one_pass
from ._options import BSOptions
from ._rows import check_sequence_reduction, is_dtensor, logits_rows, reduce_rows
from .autograd import backend_rows
from .epilogue import BSTokenStats, RowOutputs
from .reference import reference_rows


def _compute_rows(
    rows: torch.Tensor, rows_labels: torch.Tensor, impl: str, options: BSOptions, *, inplace_backward: bool = False
) -> RowOutputs:
    """Per-row outputs of ``impl`` (resolved for the rows' device) on rows [N, V] with labels [N] (-1 = ignored)."""
    if impl == "reference":
        return reference_rows(rows, rows_labels, options)
    # "auto" and the kernel impls are resolved inside the operators, when they run: never while torch.compile traces
    # (importing or building a backend cannot be traced).
    return backend_rows(impl, rows, rows_labels, options, inplace_backward=inplace_backward)


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
            the logits are overwritten, so only use it when nothing else needs them). Autograd raises "modified by
            an inplace operation" if another node saved the logits and runs later (a z-loss on the same logits, a
            second backward with retain_graph=True). Leaf logits are overwritten too: copy them back before
            reusing them.

    On CPU with impl="native" (or "auto"), a reduced loss (not "none") of logits that require grad, without
    inplace_backward, is computed together with its gradient in one pass over the logits (bs_kernels/one_pass.py):
    the [N, V] gradient buffer is then allocated in forward (and held until backward) instead of in backward.

    Returns:
        The reduced loss (float32, float64 for float64 logits), and the stats when ``return_stats``.
    """

    def checked_options() -> BSOptions:
        options = opts.loss_options(
            lam=lam,
            top_k=top_k,
            belief_temperature=belief_temperature,
            detach_belief=detach_belief,
            ignore_index=ignore_index,
            reduction=reduction,
            impl=impl,
        )
        opts.check_flags(shift=shift, return_stats=return_stats, inplace_backward=inplace_backward)
        return options

    # Sharded over the vocabulary (tensor parallelism): bs_kernels/dtensor.py, before any check, which it runs on
    # every rank at once (a rank failing here alone would leave the others waiting in the first collective).
    if is_dtensor(logits):
        from .dtensor import dtensor_token_loss

        return dtensor_token_loss(
            logits,
            labels,
            checked_options,
            impl=impl,
            shift=shift,
            return_stats=return_stats,
            inplace_backward=inplace_backward,
        )
    options = checked_options()
    check_sequence_reduction(labels, shift=shift, reduction=reduction)
    rows, rows_labels, layout = logits_rows(logits, labels, shift=shift, ignore_index=options.ignore_index)
    if one_pass.applies(rows, impl, options, inplace_backward):  # a scalar loss under autograd on CPU
        loss, outputs = one_pass.one_pass_loss(rows, rows_labels, layout, options, impl)
    else:
        outputs = _compute_rows(rows, rows_labels, impl, options, inplace_backward=inplace_backward)
        loss = reduce_rows(outputs.row_loss, rows_labels, layout, options.reduction)
    if not return_stats:
        return loss
    return loss, BSTokenStats.of_rows(layout, outputs)


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

    def checked_options() -> BSOptions:
        options = opts.forget_options(ignore_index=ignore_index, impl=impl)
        opts.check_flags(shift=shift)
        return options

    if is_dtensor(logits):  # sharded over the vocabulary: bs_kernels/dtensor.py (it runs the checks, as above)
        from .dtensor import dtensor_token_loss

        return dtensor_token_loss(
            logits, labels, checked_options, impl=impl, shift=shift, return_stats=False, inplace_backward=False
        )
    options = checked_options()
    rows, rows_labels, layout = logits_rows(logits, labels, shift=shift, ignore_index=options.ignore_index)
    return layout.unflatten(_compute_rows(rows, rows_labels, impl, options).row_loss)


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
        opts.loss_options(
            lam=lam,
            top_k=top_k,
            belief_temperature=belief_temperature,
            detach_belief=detach_belief,
            ignore_index=ignore_index,
            reduction=reduction,
            impl=impl,
        )
        opts.check_flags(shift=shift)
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
