"""The autograd Function shared by every logits backend, and the operators through which it calls them.

Forward runs the backend's one pass and the O(N·k) epilogue; it saves only per-row statistics (the row max m and
log_sum, belief ids and gradient coefficients) besides the logits the caller already holds. Backward recomputes pi
from m and log_sum.
The reduction over rows happens outside, in plain PyTorch, so one Function serves every reduction.

Every backend is reached through three ``torch.library.custom_op`` operators (``bs_kernels::rows_forward``,
``rows_backward`` and the in-place ``rows_backward_``) that take the impl string ("auto" included) and resolve it
when they run. To torch.compile they are opaque calls with the shapes of their fake implementations, so a compiled
training loop traces ``bs_token_loss`` with ``fullgraph=True`` whatever a backend does inside (building or importing
it, host checks, a C++ call, a Triton launch). They also make
the in-place backward safe: the operator declares that it mutates the logits, so autograd bumps their version
counter, and any other node that saved the same logits (a z-loss, a second ``backward(retain_graph=True)``)
raises autograd's "modified by an inplace operation" error instead of reading a gradient as if it were logits.
"""

from __future__ import annotations

import functools

import torch

from ._dtypes import compute_dtype
from ._options import BSOptions
from .backends import get_backend, resolve_impl
from .backends.contract import RawRowStats
from .epilogue import RowOutputs, backward_rows, finish_rows


def first_order_only(backward):
    """Wrap an autograd Function's backward: refuse a differentiable backward (create_graph=True).

    The kernels' gradient is not itself differentiable (no autograd formula for it). Autograd runs a backward with
    grad mode on exactly when create_graph=True, so the check is there: without it, a backward that returns
    precomputed gradients would hand back a gradient silently detached from the graph (a gradient penalty would
    get a zero second-order term), and one that calls a kernel would fail deep inside torch.
    """

    @functools.wraps(backward)
    def checked(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "bs_kernels: second derivatives (backward or torch.autograd.grad with create_graph=True, double "
                'backward) are not supported by the kernel impls ("torch", "native", "triton", and "auto"); use '
                'impl="reference", whose gradient is differentiable'
            )
        return backward(ctx, *grads)

    return checked


def refuse_functorch(impl: str) -> None:
    """torch.func transforms (grad, vmap, jacrev, ...) cannot run the kernels' autograd Functions: say so clearly.

    Checked where the Function is applied, with the same condition autograd.Function.apply uses; never while
    torch.compile traces (it handles its own transforms).
    """
    if not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active():
        raise RuntimeError(
            f'bs_kernels: torch.func transforms (grad, vmap, jacrev, ...) are not supported with impl="{impl}"; use '
            'impl="reference" inside torch.func, or torch.autograd (loss.backward(), torch.autograd.grad) with the '
            "kernel impls"
        )


def _backend(impl: str, device: torch.device):
    """The backend module of a kernel impl or "auto"; RuntimeError with the reason when it cannot run."""
    return get_backend(resolve_impl(impl, device), device)


@torch.library.custom_op("bs_kernels::rows_forward", mutates_args=())
def rows_forward(
    logits: torch.Tensor, labels: torch.Tensor, top_k: int, impl: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(m [N], log_sum [N], z_y [N], top-k logits [N, k], their int64 ids [N, k]) of kernel impl ``impl``
    (RawRowStats, contract.py)."""
    raw = _backend(impl, logits.device).forward(logits, labels, top_k)
    return raw.row_max, raw.log_sum, raw.label_logits, raw.belief_logits, raw.belief_ids.to(torch.int64)


@rows_forward.register_fake
def _rows_forward_fake(logits, labels, top_k, impl):
    num_rows, stats_dtype = logits.shape[0], compute_dtype(logits.dtype)
    return (
        logits.new_empty((num_rows,), dtype=stats_dtype),
        logits.new_empty((num_rows,), dtype=stats_dtype),
        logits.new_empty((num_rows,), dtype=stats_dtype),
        logits.new_empty((num_rows, top_k), dtype=stats_dtype),
        logits.new_empty((num_rows, top_k), dtype=torch.int64),
    )


@torch.library.custom_op("bs_kernels::rows_backward", mutates_args=())
def rows_backward(
    grad_rows: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    row_max: torch.Tensor,
    log_sum: torch.Tensor,
    belief_ids: torch.Tensor,
    belief_weights: torch.Tensor,
    label_weight: float,
    impl: str,
) -> torch.Tensor:
    """The contract's gradient [N, V] in the logits' dtype, in a new tensor."""
    backend = _backend(impl, logits.device)
    return backend.backward(
        grad_rows, logits, labels, row_max, log_sum, belief_ids, belief_weights, label_weight, False
    )


@rows_backward.register_fake
def _rows_backward_fake(grad_rows, logits, labels, row_max, log_sum, belief_ids, belief_weights, label_weight, impl):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.custom_op("bs_kernels::rows_backward_", mutates_args=("logits",))
def rows_backward_(
    grad_rows: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    row_max: torch.Tensor,
    log_sum: torch.Tensor,
    belief_ids: torch.Tensor,
    belief_weights: torch.Tensor,
    label_weight: float,
    impl: str,
) -> None:
    """The contract's gradient written over ``logits`` (a backend that cannot write in place returns a copy)."""
    backend = _backend(impl, logits.device)
    grad = backend.backward(grad_rows, logits, labels, row_max, log_sum, belief_ids, belief_weights, label_weight, True)
    if grad is not logits:
        logits.copy_(grad)


@rows_backward_.register_fake
def _rows_backward_inplace_fake(
    grad_rows, logits, labels, row_max, log_sum, belief_ids, belief_weights, label_weight, impl
):
    return None


class BSTokenRowsFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        logits: torch.Tensor,  # [N, V], unit stride along V
        labels: torch.Tensor,  # [N] int64, -1 = ignored
        impl: str,  # "auto" or a kernel impl, resolved by the operators
        options: BSOptions,
        inplace_backward: bool,  # the backward may overwrite the logits with their gradient
    ):
        raw = RawRowStats(
            *torch.ops.bs_kernels.rows_forward(logits, labels, options.belief_count(logits.shape[-1]), impl)
        )
        rows = finish_rows(raw, labels, options)
        ctx.save_for_backward(logits, labels, rows.row_max, rows.log_sum, rows.belief_ids, rows.belief_weights)
        ctx.impl = impl
        ctx.label_weight = options.label_weight
        ctx.inplace_backward = inplace_backward
        ctx.mark_non_differentiable(rows.token_logprobs, rows.belief_ids, rows.belief_probs)
        return rows.row_loss, rows.token_logprobs, rows.belief_ids, rows.belief_probs

    @staticmethod
    @first_order_only
    def backward(ctx, grad_row_loss, *unused_grads):
        logits, labels, row_max, log_sum, belief_ids, belief_weights = ctx.saved_tensors
        grad_rows, row_max = backward_rows(grad_row_loss, labels, row_max)
        arguments = (
            grad_rows,
            logits,
            labels,
            row_max,
            log_sum,
            belief_ids,
            belief_weights,
            ctx.label_weight,
            ctx.impl,
        )
        if ctx.inplace_backward:
            torch.ops.bs_kernels.rows_backward_(*arguments)
            return logits, None, None, None, None
        return torch.ops.bs_kernels.rows_backward(*arguments), None, None, None, None


def backend_rows(
    impl: str,
    logits: torch.Tensor,
    labels: torch.Tensor,
    options: BSOptions,
    *,
    inplace_backward: bool = False,
) -> RowOutputs:
    """Per-row outputs of kernel impl ``impl`` (or "auto"), differentiable w.r.t. ``logits`` (first order only)."""
    refuse_functorch(impl)
    row_loss, token_logprobs, belief_ids, belief_probs = BSTokenRowsFunction.apply(
        logits, labels, impl, options, inplace_backward
    )
    return RowOutputs(
        row_loss=row_loss,
        token_logprobs=token_logprobs,
        belief_ids=belief_ids,
        belief_probs=belief_probs,
        row_max=None,
        log_sum=None,
        belief_weights=None,
    )
