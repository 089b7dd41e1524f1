"""impl="torch": the one-pass algorithm in plain PyTorch, chunked over rows; runs on any device.

Algorithm, per chunk of rows (a [rows, V] slice of the logits):
  forward   1. (v, H) = topk(z, k)           the beliefs; their largest value is the row max m
            2. log_sum = log sum exp(z - m)  into a reused workspace (no max pass of its own)
            3. z_y = z[label]                a gather
  backward  4. g = -grad_row * pi            pi = exp((z - m) - log_sum), written straight into the gradient buffer
                                             (no temporary for fp32)
            5. g[y] += grad_row * (1 - lam);  g[H] += grad_row * belief_weights   two scatter-adds of O(k) per row
            6. g[rows with grad_row = 0] = 0  ignored rows stay 0 even where their logits are NaN or +inf

Memory: the gradient (1x the logits, unavoidable) plus one workspace of at most CHUNK_ELEMENTS float32 elements;
nothing of size [N, V] is saved between forward and backward.
Limits: each PyTorch op is its own pass over the chunk (about four in forward, three in backward), where a fused
kernel needs one each. This backend is the portable baseline; the native and triton backends are the fast ones.
"""

from __future__ import annotations

import torch

from .._dtypes import compute_dtype
from .contract import RawRowStats

NAME = "torch"

# Step 4 folds the scale into the exponent, exp(z - (m + log_sum - log|grad_row|)), which saves a multiply pass but
# rounds that shift once: a relative error up to |shift| * 2^-24 on every entry (6e-4 at |z| ~ 1e4). Above this
# bound the exponent is z - m (exact where z is near m) and the scale, -grad_row * exp(-log_sum), a separate
# multiply. At 64 the fold's error stays below 4e-6 relative, under float32's share of the test tolerances.
FOLDED_SCALE_MAX_EXPONENT = 64.0

# 16 Mi elements = 64 MiB of float32 per chunk (341 rows at V = 49 152). Measured with two threads against 0.5, 1
# and 4 Mi: every PyTorch op ends in a thread barrier, and fewer, larger ops won clearly (1.3x -> 4.6x over the
# reference, busy machine), more than cache-sized chunks gained from locality. The peak stays near 1.17x the logits.
CHUNK_ELEMENTS = 1 << 24


def unavailable_reason(device: torch.device) -> str | None:
    return None


def rows_per_chunk(num_rows: int, vocab_size: int) -> int:
    return max(1, min(num_rows, CHUNK_ELEMENTS // max(vocab_size, 1)))


def forward(logits: torch.Tensor, labels: torch.Tensor, top_k: int) -> RawRowStats:
    num_rows, vocab_size = logits.shape
    stats_dtype = compute_dtype(logits.dtype)
    device = logits.device
    row_maxes = torch.empty(num_rows, dtype=stats_dtype, device=device)
    log_sum = torch.empty(num_rows, dtype=stats_dtype, device=device)
    label_logits = torch.empty(num_rows, dtype=stats_dtype, device=device)
    belief_logits = torch.empty(num_rows, top_k, dtype=stats_dtype, device=device)
    belief_ids = torch.empty(num_rows, top_k, dtype=torch.int64, device=device)
    safe_labels = labels.clamp(min=0).unsqueeze(-1)
    step = rows_per_chunk(num_rows, vocab_size)
    workspace = torch.empty(step, vocab_size, dtype=stats_dtype, device=device)
    for start in range(0, num_rows, step):
        rows = slice(start, start + step)
        z = logits[rows]
        shifted = workspace[: z.shape[0]]
        if top_k > 0:
            values, ids = torch.topk(z, top_k, dim=-1, sorted=False)
            belief_logits[rows] = values
            belief_ids[rows] = ids
            row_max = values.amax(-1, keepdim=True).to(stats_dtype)
        else:
            row_max = z.amax(-1, keepdim=True).to(stats_dtype)
        # A row of -inf only (masked padding) has no maximum to subtract; 0 keeps exp(-inf - 0) = 0, log_sum = -inf.
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        torch.sub(z, row_max, out=shifted)
        row_maxes[rows] = row_max.squeeze(-1)
        log_sum[rows] = shifted.exp_().sum(-1).log_()
        label_logits[rows] = z.gather(-1, safe_labels[rows]).squeeze(-1).to(stats_dtype)
    return RawRowStats(
        row_max=row_maxes,
        log_sum=log_sum,
        label_logits=label_logits,
        belief_logits=belief_logits,
        belief_ids=belief_ids,
    )


def backward(
    grad_rows: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    row_max: torch.Tensor,
    log_sum: torch.Tensor,
    belief_ids: torch.Tensor,
    belief_weights: torch.Tensor,
    label_weight: float,
    inplace: bool,
) -> torch.Tensor:
    num_rows, vocab_size = logits.shape
    stats_dtype = compute_dtype(logits.dtype)
    grad = logits if inplace else torch.empty_like(logits, memory_format=torch.contiguous_format)
    valid = labels >= 0
    safe_labels = labels.clamp(min=0).unsqueeze(-1)
    label_coef = (grad_rows * (label_weight * valid.to(grad_rows.dtype))).unsqueeze(-1)
    belief_coef = grad_rows.unsqueeze(-1) * belief_weights
    # -grad_row * pi = -sign(grad_row) * exp(z - (m + log_sum - log|grad_row|)): the scale rides in the exponent,
    # saving a multiply pass; grad_row = 0 gives exp(-inf) = 0 exactly (for finite z).
    exponent_shift = (row_max + (log_sum - grad_rows.abs().log())).unsqueeze(-1)
    counted_shifts = exponent_shift[grad_rows != 0]
    fold_scale = counted_shifts.numel() == 0 or bool(counted_shifts.abs().amax() <= FOLDED_SCALE_MAX_EXPONENT)
    if fold_scale:
        negated_sign = grad_rows.sign().neg().unsqueeze(-1)
    else:
        # exp((z - m) - log_sum) = exp(z - m) * exp(-log_sum): the second factor (<= 1) joins the scale.
        exponent_shift = row_max.unsqueeze(-1)
        negated_sign = (grad_rows.neg() * log_sum.neg().exp()).unsqueeze(-1)
    all_nonnegative = bool((grad_rows >= 0).all())
    has_beliefs = belief_ids.shape[-1] > 0
    writes_in_place = grad.dtype == stats_dtype
    step = rows_per_chunk(num_rows, vocab_size)
    workspace = None if writes_in_place else torch.empty(step, vocab_size, dtype=stats_dtype, device=logits.device)
    for start in range(0, num_rows, step):
        rows = slice(start, start + step)
        z = logits[rows]
        g = grad[rows] if writes_in_place else workspace[: z.shape[0]]
        torch.sub(z, exponent_shift[rows], out=g).exp_()
        if fold_scale and all_nonnegative:
            g.neg_()
        else:
            g.mul_(negated_sign[rows])
        g.scatter_add_(-1, safe_labels[rows], label_coef[rows])
        if has_beliefs:
            g.scatter_add_(-1, belief_ids[rows], belief_coef[rows])
        if not writes_in_place:
            grad[rows].copy_(g)
    # exp(z - inf) is NaN where z is NaN or +inf: rows that do not count must still get exactly 0 (docs/math.md).
    grad[grad_rows == 0] = 0
    return grad
