"""The O(N·k) epilogue shared by every kernel backend: one pass's statistics -> row values, q, gradient coefficients.

A backend's forward (backends/contract.py) yields per row only lse, the label's logit and the top-k (value, id)
pairs. Everything that depends on lam, the belief temperature or the stop-gradient is computed here, on [N] and
[N, k] tensors in plain PyTorch, so that the kernels stay small and the -inf guards exist in one place. The
autograd Function (autograd.py) and the fused linear loss (linear.py) both call :func:`finish_rows`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._options import BSOptions
from .backends.contract import RawRowStats


class RowOutputs(NamedTuple):
    """Per-row results of a backend (or of the reference), in the compute dtype of the logits."""

    row_loss: torch.Tensor  # [N]    l = <t, log pi>, 0 on ignored rows
    token_logprobs: torch.Tensor  # [N]    log p(y), 0 on ignored rows
    belief_ids: torch.Tensor  # [N, k] int64
    belief_probs: torch.Tensor  # [N, k] q, renormalised over the top k
    lse: torch.Tensor  # [N]    finite on every row (0 where the row had no finite logit)
    belief_weights: torch.Tensor  # [N, k] the coefficient of e_{belief_id} in dl/dz (see finish_rows)


def finish_rows(raw: RawRowStats, labels: torch.Tensor, options: BSOptions) -> RowOutputs:
    """Turn one pass's statistics into the per-row value, the forget log-prob, q and the gradient coefficients.

    raw: one backend forward over rows whose labels are ``labels`` [N] (int64, -1 = ignored); options: lam, the
    belief temperature and detach_belief are used (ignore_index and reduction were applied before and after).

    With H the belief ids, v their logits and tau the temperature:
        q_v  = softmax_H(v / tau)
        l    = (1 - lam) * (z_y - lse) + lam * sum_H q_v * (v - lse)
        dl/dz = t - pi,   t = lam * q + (1 - lam) * e_y                  (beliefs detached)
        dl/dz += lam * q_v * (v - sum_H q_u * u) / tau  on H               (beliefs not detached)
    The last line follows from dq_v/dz_w = q_v (delta_vw - q_w) / tau on H:
        d/dz_w sum_v q_v (z_v - lse) [q only] = q_w / tau * ((z_w - lse) - sum_v q_v (z_v - lse))
                                              = q_w / tau * (z_w - sum_v q_v z_v).
    A belief whose logit is -inf has q_v = 0; every product with it is guarded so 0 * (-inf) never forms a NaN.
    """
    lam, belief_temperature = options.lam, options.belief_temperature
    valid = labels >= 0
    lse = raw.lse
    finite_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    token_logprobs = torch.where(valid, raw.label_logits - lse, torch.zeros_like(lse))

    belief_logits = raw.belief_logits
    if belief_logits.shape[-1] == 0:
        # Forget log-probs only (lam = 0, no beliefs): l = log p(y).
        return RowOutputs(
            row_loss=token_logprobs,
            token_logprobs=token_logprobs.clone(),  # a distinct tensor: autograd marks this one non-differentiable
            belief_ids=raw.belief_ids.to(torch.int64),
            belief_probs=belief_logits.clone(),
            lse=finite_lse,
            belief_weights=belief_logits.clone(),
        )

    belief_probs = torch.softmax(belief_logits / belief_temperature, dim=-1)
    # A row whose logits are all -inf has no distribution at all; it can only be an ignored row.
    belief_probs = torch.nan_to_num(belief_probs, nan=0.0)
    has_mass = belief_probs > 0
    zero = torch.zeros_like(belief_probs)
    belief_logprobs = torch.where(has_mass, belief_logits - lse.unsqueeze(-1), zero)
    belief_term = (belief_probs * belief_logprobs).sum(-1)
    row_loss = (1.0 - lam) * token_logprobs + lam * belief_term
    row_loss = torch.where(valid, row_loss, torch.zeros_like(row_loss))

    belief_weights = lam * belief_probs
    if not options.detach_belief:
        finite_beliefs = torch.where(has_mass, belief_logits, zero)
        belief_mean = (belief_probs * finite_beliefs).sum(-1, keepdim=True)
        centred = torch.where(has_mass, (finite_beliefs - belief_mean) / belief_temperature, zero)
        belief_weights = belief_weights * (1.0 + centred)
    belief_weights = torch.where(valid.unsqueeze(-1), belief_weights, zero)

    return RowOutputs(
        row_loss=row_loss,
        token_logprobs=token_logprobs,
        belief_ids=raw.belief_ids.to(torch.int64),
        belief_probs=belief_probs,
        lse=finite_lse,
        belief_weights=belief_weights,
    )
