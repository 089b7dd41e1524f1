"""Loss terms on per-token quantities (docs/math.md, "Objectives"); every one is minimised.

Forget terms are functions of per-token quantities from bs_kernels (``forget_logprobs``: log p(label) per answer
token; ``bs_token_loss``: the BS-T value), never of a [B, T, V] probability tensor. The reductions are
``bs_kernels.reduce_token_values``, the same ones the kernels' losses use.

    ga      mean log p(y) over forget answer tokens                     (token mean by default)
    npo     (2 / beta) * mean_seq softplus(beta * (log p_theta(y|x) - log p_ref(y|x)))
    nll     -mean log p(y) over retain answer tokens
    kl      mean over positions of KL(pi_ref || pi_theta), in row chunks (no [B, T, V] softmax kept)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bs_kernels import IGNORE_INDEX, reduce_token_values

KL_ROWS_PER_CHUNK = 256


def answer_mask(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] labels -> [B, T - 1] bool: positions whose (shifted) label counts."""
    return labels[:, 1:] != IGNORE_INDEX


def masked_token_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    """Detached mean of per-position values over the valid positions (for logging; 0 when none is valid)."""
    return float(reduce_token_values(values.detach(), mask, "token_mean"))


def ga_loss(token_logprobs: torch.Tensor, mask: torch.Tensor, *, reduction: str = "token_mean") -> torch.Tensor:
    """Gradient ascent: the mean log p(y) over forget answer tokens ([B, T'] inputs). Minimising it forgets."""
    return reduce_token_values(token_logprobs, mask, reduction)


def npo_loss(
    token_logprobs: torch.Tensor, ref_token_logprobs: torch.Tensor, mask: torch.Tensor, *, beta: float = 0.1
) -> torch.Tensor:
    """NPO: (2/beta) * mean over sequences of log(1 + (p_theta(y|x) / p_ref(y|x))^beta).

    Sequence log-probs are sums of per-token log-probs over the answer; log(1 + exp(x)) is softplus (stable for any
    x). Sequences without an answer token are left out of the mean.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    sequence_logprob = (token_logprobs * mask).sum(-1)
    ref_sequence_logprob = (ref_token_logprobs * mask).sum(-1)
    has_answer = mask.any(-1)
    per_sequence = F.softplus(beta * (sequence_logprob - ref_sequence_logprob)) * (2.0 / beta)
    return (per_sequence * has_answer).sum() / has_answer.sum().clamp(min=1)


def nll_loss(token_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Retain NLL: -mean log p(y) over retain answer tokens (the Hugging Face pooled mean)."""
    return -reduce_token_values(token_logprobs, mask, "token_mean")


class RowKL(torch.autograd.Function):
    """Per-row KL(softmax(ref) || softmax(z)) for selected rows, computed ``chunk`` rows at a time.

    Forward, per row:  KL = sum_v p_ref,v * (log p_ref,v - z_v + LSE(z)).
    Backward: dKL/dz_v = -p_ref,v + softmax(z)_v  (the p_ref log p_ref term does not depend on z; d LSE/dz = pi),
    recomputed chunk by chunk from the saved logits, so the only [rows, V] temporaries are chunk-sized.
    """

    @staticmethod
    def forward(ctx, logits, ref_logits, row_index, chunk):
        # logits, ref_logits: [N, V]; row_index: [M] int64 rows to use; returns [M] float32.
        out = torch.empty(row_index.numel(), dtype=torch.float32, device=logits.device)
        for start in range(0, row_index.numel(), chunk):
            rows = row_index[start : start + chunk]
            log_p = torch.log_softmax(logits[rows].float(), dim=-1)
            log_ref = torch.log_softmax(ref_logits[rows].float(), dim=-1)
            out[start : start + chunk] = (log_ref.exp() * (log_ref - log_p)).sum(-1)
        ctx.save_for_backward(logits, ref_logits, row_index)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_rows):
        logits, ref_logits, row_index = ctx.saved_tensors
        grad_logits = torch.zeros_like(logits)
        for start in range(0, row_index.numel(), ctx.chunk):
            rows = row_index[start : start + ctx.chunk]
            p = torch.softmax(logits[rows].float(), dim=-1)
            p_ref = torch.softmax(ref_logits[rows].float(), dim=-1)
            grad_logits[rows] = ((p - p_ref) * grad_rows[start : start + ctx.chunk, None]).to(logits.dtype)
        return grad_logits, None, None, None


def kl_loss(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    chunk: int = KL_ROWS_PER_CHUNK,
) -> torch.Tensor:
    """Retain KL: the mean of KL(pi_ref || pi_theta) over positions.

    logits, ref_logits: [B, T, V] (ref_logits from the frozen reference model, no gradient). With ``labels`` [B, T]
    the positions are the answer positions (logits at t belong to label t + 1, as in the loss); with ``labels=None``
    every one of the B*T positions counts (open-unlearning's ``kl_div(..., reduction="batchmean")`` over the flattened
    rows).
    """
    if logits.shape != ref_logits.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and ref_logits {tuple(ref_logits.shape)} differ in shape")
    vocab = logits.shape[-1]
    if labels is None:
        row_index = torch.arange(logits.shape[0] * logits.shape[1], device=logits.device)
    else:
        valid = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
        valid[:, :-1] = answer_mask(labels)
        row_index = valid.reshape(-1).nonzero().squeeze(-1)
    if row_index.numel() == 0:
        return logits.sum() * 0.0
    rows_kl = RowKL.apply(logits.reshape(-1, vocab), ref_logits.detach().reshape(-1, vocab), row_index, chunk)
    return rows_kl.mean()
