"""The O(N·k) epilogue shared by every kernel backend: one pass's statistics -> row values, q, gradient coefficients.

A backend's forward (backends/contract.py) yields per row only the max m and log_sum = log sum exp(z - m), the
label's logit and the top-k (value, id) pairs. Everything that depends on lam, the belief temperature or the
stop-gradient is computed here, on [N] and [N, k] tensors in plain PyTorch, so that the kernels stay small and the
-inf guards exist in one place. The autograd Function (autograd.py) and the fused linear loss (linear.py) both call
:func:`finish_rows`; :class:`BSTokenStats` is what the public functions return of its row outputs, in the labels' shape.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._options import BSOptions
from ._rows import RowLayout
from .backends.contract import RawRowStats


class RowOutputs(NamedTuple):
    """Per-row results of a backend (or of the reference), in the compute dtype of the logits."""

    row_loss: torch.Tensor  # [N]    l = <t, log pi>, 0 on ignored rows
    token_logprobs: torch.Tensor  # [N]    log p(y), 0 on ignored rows
    belief_ids: torch.Tensor  # [N, k] int64
    belief_probs: torch.Tensor  # [N, k] q, renormalised over the top k
    row_max: torch.Tensor  # [N]    m; 0 on rows without a distribution, NaN on counted ones (see finish_rows)
    log_sum: torch.Tensor  # [N]    log sum exp(z - m); 0 on rows without a distribution
    belief_weights: torch.Tensor  # [N, k] the coefficient of e_{belief_id} in dl/dz (see finish_rows)


class BSTokenStats(NamedTuple):
    """Per (shifted) position statistics of one pass; shapes follow the (shifted) labels, plus k for beliefs."""

    token_logprobs: torch.Tensor  # [...]    log p(label), 0 where ignored
    belief_ids: torch.Tensor  # [..., k] int64, the k most likely ids (any order)
    belief_probs: torch.Tensor  # [..., k] q: their probabilities renormalised over the k (with the temperature)

    @classmethod
    def of_rows(cls, layout: RowLayout, rows: RowOutputs) -> BSTokenStats:
        """The statistics of [N] / [N, k] row outputs, in the (shifted) labels' shape."""
        return cls(
            token_logprobs=layout.unflatten(rows.token_logprobs),
            belief_ids=layout.unflatten(rows.belief_ids),
            belief_probs=layout.unflatten(rows.belief_probs),
        )


def finish_rows(raw: RawRowStats, labels: torch.Tensor, options: BSOptions) -> RowOutputs:
    """Turn one pass's statistics into the per-row value, the forget log-prob, q and the gradient coefficients.

    raw: one backend forward over rows whose labels are ``labels`` [N] (int64, -1 = ignored); options: lam, the
    belief temperature and detach_belief are used (ignore_index and reduction were applied before and after).

    With H the belief ids, v their logits, tau the temperature and lse = m + log_sum:
        q_v  = softmax_H(v / tau)
        l    = (1 - lam) * (z_y - lse) + lam * sum_H q_v * (v - lse)
        dl/dz = t - pi,   t = lam * q + (1 - lam) * e_y                  (beliefs detached)
        dl/dz += lam * q_v * (v - sum_H q_u * u) / tau  on H               (beliefs not detached)
    The last line follows from dq_v/dz_w = q_v (delta_vw - q_w) / tau on H:
        d/dz_w sum_v q_v (z_v - lse) [q only] = q_w / tau * ((z_w - lse) - sum_v q_v (z_v - lse))
                                              = q_w / tau * (z_w - sum_v q_v z_v).
    A belief whose logit is -inf has q_v = 0; every product with it is guarded so 0 * (-inf) never forms a NaN.
    Precision: every z - lse is formed as (z - m) - log_sum, and q and the centring from v - m, never from a rounded
    lse or v of large magnitude (backends/contract.py: at |z| = 1e10, z - lse in float32 is 0 for every z).

    Non-finite logits on a counted row (README "Non-finite logits"): a -inf label logit gives log p(y) = -inf and
    l = -inf (lam < 1) with the finite gradient t - pi. A row whose m or log_sum is not finite (a NaN or +inf
    logit, or no finite logit at all) has no distribution: its l and log p(y) are NaN and the returned row_max is
    NaN, which :func:`backward_rows` turns into a NaN gradient row. Ignored rows give 0 whatever they hold.
    """
    lam, belief_temperature = options.lam, options.belief_temperature
    valid = labels >= 0
    has_distribution = torch.isfinite(raw.row_max) & torch.isfinite(raw.log_sum)
    no_distribution = valid & ~has_distribution
    zeros = torch.zeros_like(raw.log_sum)
    nan = torch.full_like(zeros, float("nan"))
    row_max = torch.where(has_distribution, raw.row_max, zeros)
    log_sum = torch.where(has_distribution, raw.log_sum, zeros)
    returned_row_max = torch.where(no_distribution, nan, row_max)
    token_logprobs = torch.where(valid, (raw.label_logits - row_max) - log_sum, zeros)
    token_logprobs = torch.where(no_distribution, nan, token_logprobs)

    belief_logits = raw.belief_logits
    if belief_logits.shape[-1] == 0:
        # Forget log-probs only (lam = 0, no beliefs): l = log p(y).
        return RowOutputs(
            row_loss=token_logprobs,
            token_logprobs=token_logprobs.clone(),  # a distinct tensor: autograd marks this one non-differentiable
            belief_ids=raw.belief_ids.to(torch.int64),
            belief_probs=belief_logits.clone(),
            row_max=returned_row_max,
            log_sum=log_sum,
            belief_weights=belief_logits.clone(),
        )

    # Shifted by the row max (q is shift-invariant): v - m is exact, v / tau at |v| = 1e4 would not be.
    shifted_beliefs = belief_logits - row_max.unsqueeze(-1)
    belief_probs = torch.softmax(shifted_beliefs / belief_temperature, dim=-1)
    # A row whose logits are all -inf has no distribution at all; it can only be an ignored row.
    belief_probs = torch.nan_to_num(belief_probs, nan=0.0)
    has_mass = belief_probs > 0
    zero = torch.zeros_like(belief_probs)
    finite_beliefs = torch.where(has_mass, shifted_beliefs, zero)
    belief_logprobs = torch.where(has_mass, finite_beliefs - log_sum.unsqueeze(-1), zero)
    belief_term = (belief_probs * belief_logprobs).sum(-1)
    # lam = 1 weighs the label by 0: skip the term, a -inf log p(y) must not make 0 * (-inf) = NaN.
    label_term = (1.0 - lam) * token_logprobs if lam < 1.0 else torch.zeros_like(token_logprobs)
    row_loss = torch.where(valid, label_term + lam * belief_term, torch.zeros_like(token_logprobs))
    row_loss = torch.where(no_distribution, nan, row_loss)

    belief_weights = lam * belief_probs
    if not options.detach_belief:
        belief_mean = (belief_probs * finite_beliefs).sum(-1, keepdim=True)
        centred = torch.where(has_mass, (finite_beliefs - belief_mean) / belief_temperature, zero)
        belief_weights = belief_weights * (1.0 + centred)
    belief_weights = torch.where(valid.unsqueeze(-1), belief_weights, zero)

    return RowOutputs(
        row_loss=row_loss,
        token_logprobs=token_logprobs,
        belief_ids=raw.belief_ids.to(torch.int64),
        belief_probs=belief_probs,
        row_max=returned_row_max,
        log_sum=log_sum,
        belief_weights=belief_weights,
    )


def backward_rows(grad_row_loss: torch.Tensor, labels: torch.Tensor, row_max: torch.Tensor):
    """The contract backward's ``grad_rows`` and ``row_max`` from dL/dl [N] and finish_rows' row_max [N].

    grad_rows is 0 on ignored rows (l = 0 there identically, whatever the caller's weights say) and NaN on counted
    rows without a distribution (NaN row_max), so that every entry of their gradient is NaN on every backend;
    row_max is 0 there, since the backends require it finite (finish_rows' log_sum is finite already).
    """
    no_distribution = torch.isnan(row_max)
    grad_rows = torch.where(labels >= 0, grad_row_loss.to(row_max.dtype), torch.zeros_like(row_max))
    grad_rows = torch.where(no_distribution, torch.full_like(row_max, float("nan")), grad_rows).contiguous()
    return grad_rows, torch.where(no_distribution, torch.zeros_like(row_max), row_max).contiguous()
