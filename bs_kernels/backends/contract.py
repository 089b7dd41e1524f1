"""The contract every logits backend (torch, native, triton) implements, and the shared O(N·k) epilogue.

A backend module exposes:

``NAME: str``
``unavailable_reason(device: torch.device) -> str | None``
    None when the backend can run on ``device``; otherwise one sentence that says why and how to fix it.
``forward(logits, labels, top_k) -> RawRowStats``
    logits [N, V], any floating dtype, unit stride along V, any row stride; labels [N] int64 with -1 = ignored.
    One pass over each row: lse, the label's logit, and (top_k > 0) the top-k (value, index) pairs. top_k is
    already clamped to at most V; top_k == 0 means no beliefs (forget log-probs only).
``backward(grad_rows, logits, labels, lse, belief_ids, belief_weights, label_weight, inplace) -> grad_logits``
    Writes, for every row i,
        grad[i, :] = grad_rows[i] * (-pi_i + label_weight * e_{y_i} + sum_j belief_weights[i, j] * e_{belief_ids[i, j]})
    with pi_i = exp(logits[i] - lse[i]) recomputed (never saved), in the logits' dtype, into a new tensor, or into
    ``logits`` itself when ``inplace``. grad_rows is zero on ignored rows and lse is finite on every row, so the
    kernel needs no special case beyond skipping the label term where labels[i] < 0.

Everything that depends on lam, the belief temperature or the stop-gradient lives in ``finish_rows`` below, on
[N, k] tensors, so that the kernels stay small and the -inf guards exist in one place.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class RawRowStats(NamedTuple):
    """What one pass over the vocabulary yields per row (float32, or float64 for float64 logits)."""

    lse: torch.Tensor  # [N]    logsumexp of the row
    label_logits: torch.Tensor  # [N]    z_y (any value on ignored rows)
    belief_logits: torch.Tensor  # [N, k] the k largest logits, any order
    belief_ids: torch.Tensor  # [N, k] their vocabulary ids (int32 or int64)


class RowOutputs(NamedTuple):
    row_loss: torch.Tensor  # [N]    l = <t, log pi>, 0 on ignored rows
    token_logprobs: torch.Tensor  # [N]    log p(y), 0 on ignored rows
    belief_ids: torch.Tensor  # [N, k] int64
    belief_probs: torch.Tensor  # [N, k] q, renormalised over the top k
    lse: torch.Tensor  # [N]    finite on every row (0 where the row had no finite logit)
    belief_weights: torch.Tensor  # [N, k] the coefficient of e_{belief_id} in dl/dz (see finish_rows)


def finish_rows(
    raw: RawRowStats,
    labels: torch.Tensor,
    lam: float,
    belief_temperature: float,
    detach_belief: bool,
) -> RowOutputs:
    """Turn one pass's statistics into the per-row value, the forget log-prob, q and the gradient coefficients.

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
    if not detach_belief:
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
