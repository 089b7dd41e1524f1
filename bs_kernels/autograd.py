"""The autograd Function shared by every logits backend.

Forward runs the backend's one pass and the O(N·k) epilogue; it saves only per-row statistics (lse, belief ids and
gradient coefficients) besides the logits the caller already holds. Backward recomputes pi from lse.
The reduction over rows happens outside, in plain PyTorch, so one Function serves every reduction.
"""

from __future__ import annotations

from types import ModuleType

import torch

from ._options import BSOptions
from .epilogue import RowOutputs, finish_rows


class BSTokenRowsFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        logits: torch.Tensor,  # [N, V], unit stride along V
        labels: torch.Tensor,  # [N] int64, -1 = ignored
        backend: ModuleType,
        options: BSOptions,
        inplace_backward: bool,  # the backward may overwrite the logits with their gradient
    ):
        raw = backend.forward(logits, labels, options.belief_count(logits.shape[-1]))
        rows = finish_rows(raw, labels, options)
        ctx.save_for_backward(logits, labels, rows.lse, rows.belief_ids, rows.belief_weights)
        ctx.backend = backend
        ctx.label_weight = options.label_weight
        ctx.inplace_backward = inplace_backward
        ctx.mark_non_differentiable(rows.token_logprobs, rows.belief_ids, rows.belief_probs)
        return rows.row_loss, rows.token_logprobs, rows.belief_ids, rows.belief_probs

    @staticmethod
    def backward(ctx, grad_row_loss, *unused_grads):
        logits, labels, lse, belief_ids, belief_weights = ctx.saved_tensors
        # Ignored rows have l = 0 identically; their gradient is zero whatever the caller's weights say.
        grad_rows = torch.where(labels >= 0, grad_row_loss.to(lse.dtype), torch.zeros_like(lse)).contiguous()
        grad_logits = ctx.backend.backward(
            grad_rows, logits, labels, lse, belief_ids, belief_weights, ctx.label_weight, ctx.inplace_backward
        )
        return grad_logits, None, None, None, None


def backend_rows(
    backend: ModuleType,
    logits: torch.Tensor,
    labels: torch.Tensor,
    options: BSOptions,
    *,
    inplace_backward: bool = False,
) -> RowOutputs:
    """Per-row outputs of a kernel backend, differentiable w.r.t. ``logits`` through BSTokenRowsFunction."""
    row_loss, token_logprobs, belief_ids, belief_probs = BSTokenRowsFunction.apply(
        logits, labels, backend, options, inplace_backward
    )
    return RowOutputs(
        row_loss=row_loss,
        token_logprobs=token_logprobs,
        belief_ids=belief_ids,
        belief_probs=belief_probs,
        lse=None,
        belief_weights=None,
    )
