"""A scalar loss and its gradient in one pass over the logits (impl="native"): the common training case on CPU.

Every reduction but "none" is linear in the per-row values, L = sum_i w_i l_i, with weights w_i that depend on the
labels only (:func:`reduction_weights`). So when autograd will need dL/dz, the gradient w_i * dl_i/dz_i can be
formed during forward: the native kernel writes each row's dense part -w_i * pi_i right after the row's statistics,
while the row is still in cache (one read of the logits from memory and one write of the gradient, against one read
in forward plus one read and one write in backward), and the backend's ``sparse_grad_`` then rewrites the k + 1 sparse
entries per row from the statistics and the epilogue's coefficients (O(N k)). Backward only scales the stored
gradient by the incoming scalar (nothing to do when it is exactly 1) and hands it over; peak memory stays the
logits plus one gradient, which is now allocated in forward instead of backward.

Where it is not used (bs_token_loss keeps the two-pass path of autograd.py): reduction="none" or forget log-probs
(the caller weighs rows freely), inplace_backward=True (the gradient must not overwrite the logits before backward:
anything that reads them between forward and backward would read a gradient), no gradient needed, a backend other
than native, and inside torch.compile (its backward must stay a traced function of saved tensors).
A second backward (retain_graph=True) recomputes the gradient the two-pass way, from the saved statistics, so it is
correct and independent of the first; create_graph=True and torch.func transforms raise the two-pass path's errors
(autograd.first_order_only, autograd.refuse_functorch).
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

from ._dtypes import compute_dtype
from ._options import BSOptions
from ._rows import RowLayout, reduce_rows
from .autograd import (
    first_order_only,
    refuse_functorch,
    rows_backward,  # noqa: F401  (registers bs_kernels::rows_backward, used below)
)
from .backends import get_backend, resolve_impl
from .epilogue import RowOutputs, backward_rows, finish_rows

# Benchmarks only: "1" keeps bs_token_loss and bs_linear_loss on the two-pass path (forward, then backward reads the
# logits again), so both can be timed side by side in one process (benchmarks/providers.py, native:two-pass).
TWO_PASS_ENV = "BS_KERNELS_NATIVE_TWO_PASS"


def reduction_weights(rows_labels: torch.Tensor, layout: RowLayout, reduction: str, dtype) -> torch.Tensor:
    """w[i] = dL/dl_i for every row (flattened like the inputs), taken from the reduction itself (reduce_rows).

    Every reduction but "none" is linear in the per-row values, so differentiating it once at any point (here zero)
    gives its exact weights, bit for bit those autograd passes to the rows when the loss's gradient is 1.
    """
    with torch.enable_grad():
        probe = torch.zeros(rows_labels.shape, dtype=dtype, device=rows_labels.device, requires_grad=True)
        (weights,) = torch.autograd.grad(reduce_rows(probe, rows_labels, layout, reduction), probe)
    return weights


def forward_with_grad(
    backend: ModuleType,
    logits: torch.Tensor,
    labels: torch.Tensor,
    grad_rows: torch.Tensor,
    options: BSOptions,
    *,
    inplace: bool,
) -> tuple[RowOutputs, torch.Tensor]:
    """finish_rows' outputs of [N, V] logits and dL/dz = grad_rows[i] * dl_i/dz_i, for a backend with forward_grad
    and sparse_grad_ (native), in one pass over the logits; written into ``logits`` when ``inplace``."""
    raw, grad = backend.forward_grad(logits, labels, options.belief_count(logits.shape[-1]), grad_rows, inplace)
    rows = finish_rows(raw, labels, options)
    sparse_grad_rows, row_max = backward_rows(grad_rows, labels, rows.row_max)
    backend.sparse_grad_(
        grad,
        sparse_grad_rows,
        labels,
        row_max,
        rows.log_sum,
        raw,
        rows.belief_ids,
        rows.belief_weights,
        options.label_weight,
    )
    return rows, grad


def has_forward_grad(backend: ModuleType) -> bool:
    """Whether ``backend`` forms the gradient in its forward pass (native), unless TWO_PASS_ENV turns that off."""
    return hasattr(backend, "forward_grad") and os.environ.get(TWO_PASS_ENV, "0") in ("", "0")


def applies(logits: torch.Tensor, impl: str, options: BSOptions, inplace_backward: bool) -> bool:
    """Whether bs_token_loss on rows ``logits`` takes the one-pass path (see the module docstring)."""
    return (
        options.reduction != "none"
        and not inplace_backward
        and logits.requires_grad
        and torch.is_grad_enabled()
        and logits.device.type == "cpu"
        and impl in ("auto", "native")
        and not torch.compiler.is_compiling()
        and resolve_impl(impl, logits.device) == "native"
        and has_forward_grad(get_backend("native", logits.device))
    )


class OnePassLossFunction(torch.autograd.Function):
    """The reduced loss of rows [N, V]; its gradient formed in forward, scaled (or handed over as is) in backward."""

    @staticmethod
    def forward(ctx, logits, labels, layout: RowLayout, options: BSOptions):
        row_weights = reduction_weights(labels, layout, options.reduction, compute_dtype(logits.dtype))
        rows, grad = forward_with_grad(
            get_backend("native", logits.device), logits, labels, row_weights, options, inplace=False
        )
        loss = reduce_rows(rows.row_loss, labels, layout, options.reduction)
        ctx.save_for_backward(
            logits, labels, rows.row_max, rows.log_sum, rows.belief_ids, rows.belief_weights, row_weights
        )
        ctx.label_weight = options.label_weight
        ctx.grad = grad  # not saved_tensors: backward hands it over and drops this reference
        ctx.mark_non_differentiable(rows.token_logprobs, rows.belief_ids, rows.belief_probs)
        return loss, rows.token_logprobs, rows.belief_ids, rows.belief_probs

    @staticmethod
    @first_order_only
    def backward(ctx, grad_loss, *unused_grads):
        grad, ctx.grad = ctx.grad, None
        if grad is not None:
            # The incoming gradient of a scalar loss is a 0-dim CPU tensor: reading it costs nothing. As a Python
            # number it scales a bf16/fp16 gradient in float32 (one rounding), not after rounding itself to bf16.
            scale = grad_loss.item()
            if scale != 1:
                grad.mul_(scale)
            return grad, None, None, None
        # A second backward (retain_graph=True: the first one handed the gradient over): the two-pass backward, from
        # the saved statistics.
        logits, labels, row_max, log_sum, belief_ids, belief_weights, row_weights = ctx.saved_tensors
        grad_rows, row_max = backward_rows(row_weights * grad_loss, labels, row_max)
        grad = torch.ops.bs_kernels.rows_backward(
            grad_rows, logits, labels, row_max, log_sum, belief_ids, belief_weights, ctx.label_weight, "native"
        )
        return grad, None, None, None


def one_pass_loss(logits: torch.Tensor, labels: torch.Tensor, layout: RowLayout, options: BSOptions, impl: str):
    """(reduced loss, RowOutputs with the stats; row_loss, row_max, log_sum and belief_weights None) of rows [N, V],
    labels [N]; ``impl`` ("native" or "auto") only names the impl in errors."""
    refuse_functorch(impl)
    loss, token_logprobs, belief_ids, belief_probs = OnePassLossFunction.apply(logits, labels, layout, options)
    outputs = RowOutputs(
        row_loss=None,
        token_logprobs=token_logprobs,
        belief_ids=belief_ids,
        belief_probs=belief_probs,
        row_max=None,
        log_sum=None,
        belief_weights=None,
    )
    return loss, outputs
