"""The contract every logits backend (torch, native, triton) implements.

A backend module exposes:

``NAME: str``
``unavailable_reason(device: torch.device) -> str | None``
    None when the backend can run on ``device``; otherwise one sentence that says why and how to fix it.
``forward(logits, labels, top_k) -> RawRowStats``
    logits [N, V], any floating dtype, unit stride along V, any row stride; labels [N] int64 with -1 = ignored.
    One pass over each row: the row max m and log_sum = log sum_v exp(z_v - m) (lse = m + log_sum, never formed),
    the label's logit, and (top_k > 0) the top-k (value, index) pairs, all in ``compute_dtype(logits.dtype)``
    (bs_kernels/_dtypes.py). top_k is already clamped to at most V; top_k == 0 means no beliefs (forget log-probs).
``backward(grad_rows, logits, labels, row_max, log_sum, belief_ids, belief_weights, label_weight, inplace)``
    Returns grad_logits, writing for every row i
        grad[i, :] = grad_rows[i] * (-pi_i + label_weight * e_{y_i} + sum_j belief_weights[i, j] * e_{belief_ids[i, j]})
    with pi_i = exp((logits[i] - row_max[i]) - log_sum[i]) recomputed (never saved), in the logits' dtype, into a
    new tensor, or into ``logits`` itself when ``inplace``. grad_rows is zero on ignored rows and row_max, log_sum
    are finite on every row, so the kernel needs no special case beyond skipping the label term where labels[i] < 0.

Why m and log_sum and not lse: at large logit magnitudes lse = m + log_sum rounds to the ulp of m (5e-4 at
|z| = 1e4; all of log_sum at |z| = 1e10), and z - lse would carry that error into log p and pi. z - m is exact for
the logits that matter (Sterbenz), so every log-probability is formed as (z - m) - log_sum, and every pi as
exp((z - m) - log_sum), or exp(z - m) * exp(-log_sum) with the second factor once per row (it is <= 1).

Everything that depends on lam, the belief temperature or the stop-gradient lives in the epilogue
(bs_kernels/epilogue.py), on [N, k] tensors, so that the kernels stay small and the -inf guards exist in one place.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class RawRowStats(NamedTuple):
    """What one pass over the vocabulary yields per row (in compute_dtype of the logits)."""

    # A row has a distribution iff both row_max and log_sum are finite (a NaN or +inf logit, or no finite logit,
    # makes one of them non-finite; a backend may shift by 0 instead of a non-finite max).
    row_max: torch.Tensor  # [N]    m: the row's max logit, the shift of log_sum
    log_sum: torch.Tensor  # [N]    log sum_v exp(z_v - m), >= 0 where m is the finite max; lse = m + log_sum
    label_logits: torch.Tensor  # [N]    z_y (any value on ignored rows)
    belief_logits: torch.Tensor  # [N, k] the k largest logits, any order
    belief_ids: torch.Tensor  # [N, k] their vocabulary ids (int32 or int64)
