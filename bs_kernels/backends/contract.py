"""The contract every logits backend (torch, native, triton) implements.

A backend module exposes:

``NAME: str``
``unavailable_reason(device: torch.device) -> str | None``
    None when the backend can run on ``device``; otherwise one sentence that says why and how to fix it.
``forward(logits, labels, top_k) -> RawRowStats``
    logits [N, V], any floating dtype, unit stride along V, any row stride; labels [N] int64 with -1 = ignored.
    One pass over each row: lse, the label's logit, and (top_k > 0) the top-k (value, index) pairs, all in
    ``compute_dtype(logits.dtype)`` (bs_kernels/_dtypes.py). top_k is already clamped to at most V; top_k == 0
    means no beliefs (forget log-probs only).
``backward(grad_rows, logits, labels, lse, belief_ids, belief_weights, label_weight, inplace) -> grad_logits``
    Writes, for every row i,
        grad[i, :] = grad_rows[i] * (-pi_i + label_weight * e_{y_i} + sum_j belief_weights[i, j] * e_{belief_ids[i, j]})
    with pi_i = exp(logits[i] - lse[i]) recomputed (never saved), in the logits' dtype, into a new tensor, or into
    ``logits`` itself when ``inplace``. grad_rows is zero on ignored rows and lse is finite on every row, so the
    kernel needs no special case beyond skipping the label term where labels[i] < 0.

Everything that depends on lam, the belief temperature or the stop-gradient lives in the epilogue
(bs_kernels/epilogue.py), on [N, k] tensors, so that the kernels stay small and the -inf guards exist in one place.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class RawRowStats(NamedTuple):
    """What one pass over the vocabulary yields per row (in compute_dtype of the logits)."""

    lse: torch.Tensor  # [N]    logsumexp of the row
    label_logits: torch.Tensor  # [N]    z_y (any value on ignored rows)
    belief_logits: torch.Tensor  # [N, k] the k largest logits, any order
    belief_ids: torch.Tensor  # [N, k] their vocabulary ids (int32 or int64)
