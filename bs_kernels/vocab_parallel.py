"""Vocabulary-parallel BS-T: the loss on logits (or an lm_head) split over the vocabulary across a process group.

Each rank p holds the logits of a contiguous vocabulary range [start_p, start_p + V_p) (Megatron's vocab-parallel
layout; a DTensor sharded Shard(-1), as ColwiseParallel(use_local_output=False) on the lm_head produces, is adapted
by bs_kernels/dtensor.py). The one-pass algebra of docs/math.md carries over because everything the epilogue needs is a
reduction over the vocabulary that composes across shards:
  1. local pass: backend.forward on the rank's own [N, V_p] shard (the unchanged backend contract) with the labels
     moved into the shard's numbering (label - start_p where the label falls in the shard, else -1), giving per row
     the shard's max m_p and log_sum_p = log sum exp(z - m_p), its label logit (meaningful only on the rank that
     owns the label) and its top-k_p candidates, k_p = min(k, V_p), k = min(top_k, V).
  2. one all-gather of the packed per-row statistics (m_p, log_sum_p, masked label logit, k_pad candidate values
     and their global ids, k_pad = max_p k_p; never the [N, V] logits):
        m, log_sum = max_p m_p, log sum_p exp((m_p - m) + log_sum_p)   (over the shards that hold mass)
        z_y   = sum_p (z_y on rank p if p owns y else 0)
        top-k = the k largest of the P * k_pad candidates (every global belief is some shard's local candidate,
                since it is among that shard's k largest)
  3. epilogue.finish_rows on these global statistics: the row values, q and the gradient coefficients, identical on
     every rank (so every rank returns the same loss and stats).
  4. backward on each rank from its own shard, with no communication: backend.backward with the global m and
     log_sum, the shard's labels (-1 off-shard: the label term only on the owning rank) and the belief weights
     placed on the shard's own candidate slots (weight 0 for a candidate that did not make the global top-k). The
     candidates are the ids the backend itself returned, so they are distinct, as the native and Triton backward
     kernels require.
The backend contract (backends/contract.py) is therefore the one-process one: every local backend (torch, native,
triton) is the per-shard kernel as it is. Steps 1-3 and the shards' layout live in _vocab_shards.py (ShardedRows,
VocabShards), the local checks and the agreement step in _vocab_checks.py; this module holds the autograd Functions
and the public forms.
Why one all_gather rather than Megatron's all_reduce pair (max, sum-exp) plus an all_reduce of the label logit: the
top-k candidates must be gathered anyway, and m, log_sum and z_y ride along as 3 of the 3 + 2 k_pad columns (7% of
the volume at k = 20), so a call pays one collective's latency instead of four.

Ties at the k-th value (docs/math.md: any k of the tied entries may be chosen) are broken towards the lower group rank
(a stable sort over the candidates in rank order), padding slots of ranks with fewer than k_pad candidates last.

Communication per call (s = 4 bytes for float32/bfloat16/float16 logits, 8 for float64; P = group size):
  every form, first: one all_gather of the call record (below; RECORD_LENGTH = 53 int64, 424 bytes from every rank).
  logits form, forward: one all_gather of N * (3 + 2 * k_pad) elements of s bytes from every rank (the candidate
      values bit-cast beside their ids in one integer tensor); none for an empty batch (N = 0). Backward: nothing.
  fused linear form: the same all_gather per chunk of valid rows in forward (M * (3 + 2 * k_pad) elements over all
      chunks), and in backward one all_reduce of the [M, H] gradient of the hidden states (M = valid positions; the
      hidden states are replicated over the group, so their gradient is the sum of every shard's contribution).
At N = 4096 rows, k = 20, fp32 that is 688 KiB per rank per call, against about 1 GiB per rank for an all-gather of the
logits at V = 128 256 over 2 ranks (what loss functions that need the full row do).

Agreement (_vocab_call.py): the call record holds each shard's start and size, the entry point, the dtype, the labels'
shape and a checksum of their values, shift, the hidden size, top_k, lam, belief_temperature, detach_belief,
ignore_index and reduction. Ranks that disagree on any of them raise the same ValueError, naming it with every rank's
value, before any collective sized by the call. Every argument check that needs no other rank runs before the record
is sent; a rank whose check fails sends a failure record (the start of its message) and raises its own error, and the
other ranks raise a ValueError quoting it, so none waits for it. The one check that needs the group's V (labels < V)
runs after the exchange, with the same verdict on every rank.
What can still make ranks wait for each other until the process group's timeout (30 minutes by default; set it in
init_process_group): a rank that never makes the call, or makes another collective call on the group first; a rank
that fails after the exchange (out of memory, a kernel error) or skips the fused form's backward (its all_reduce).
The DTensor entry (bs_token_loss, forget_logprobs, bs_linear_loss given a sharded tensor) dispatches before the shared
entry point checks anything and runs those checks (its options and flags, and for bs_linear_loss the labels' type and
the sequence_mean rule) inside its local check (dtensor.py), so they too fail on every rank.
Not compared: the logits' or hidden states' values (the fused form needs the same hidden states on every rank), impl
(any backend may run each shard) and return_stats.
impl="reference" is refused (it needs the full row); compare with bs_token_loss on the gathered logits instead.
Limits: the logits form gathers the statistics of ignored rows too (N counts every position; the fused form drops
them first). The fused form always recomputes each logits chunk in backward (4 GEMMs per chunk, like linear.py's
reduction="none" path) rather than forming the gradients in forward, and computes in its inputs' dtype even under
torch.autocast (bs_linear_loss casts them to the autocast dtype).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import _options as opts
from ._chunks import chunk_logits, rows_per_chunk, scatter_rows
from ._dtypes import compute_dtype
from ._options import BSOptions
from ._rows import reduce_rows
from ._vocab_checks import CheckedCall, agree, check_linear_call, check_token_call
from ._vocab_shards import ShardedRows, VocabShards, shard_labels
from .autograd import first_order_only
from .epilogue import BSTokenStats, RowOutputs


class _VocabParallelRowsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, rows_labels, local_labels, sharded: ShardedRows, inplace_backward: bool):
        rows, local_ids, local_weights = sharded.rows(logits, rows_labels, local_labels)
        ctx.save_for_backward(logits, rows_labels, local_labels, rows.row_max, rows.log_sum, local_ids, local_weights)
        ctx.sharded, ctx.inplace_backward = sharded, inplace_backward
        ctx.mark_non_differentiable(rows.token_logprobs, rows.belief_ids, rows.belief_probs)
        return rows.row_loss, rows.token_logprobs, rows.belief_ids, rows.belief_probs

    @staticmethod
    @first_order_only
    def backward(ctx, grad_row_loss, *unused_grads):
        logits, rows_labels, local_labels, row_max, log_sum, local_ids, local_weights = ctx.saved_tensors
        grad = ctx.sharded.grad_logits(
            grad_row_loss,
            logits,
            rows_labels,
            local_labels,
            row_max,
            log_sum,
            local_ids,
            local_weights,
            ctx.inplace_backward,
        )
        return grad, None, None, None, None


def sharded_token_loss(
    checked: CheckedCall, shards: VocabShards, options: BSOptions, *, return_stats: bool, inplace_backward: bool
):
    """bs_token_loss on a vocabulary shard once the ranks agree (the body of both public forms and of DTensor's)."""
    rows_labels, layout = checked.rows_labels, checked.layout
    sharded = ShardedRows(checked.backend, options, shards)
    row_loss, token_logprobs, belief_ids, belief_probs = _VocabParallelRowsFunction.apply(
        checked.rows, rows_labels, shard_labels(rows_labels, shards), sharded, inplace_backward
    )
    loss = reduce_rows(row_loss, rows_labels, layout, options.reduction)
    if not return_stats:
        return loss
    outputs = RowOutputs(row_loss, token_logprobs, belief_ids, belief_probs, None, None, None)
    return loss, BSTokenStats.of_rows(layout, outputs)


def vocab_parallel_bs_token_loss(
    local_logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_start: int,
    group=None,
    *,
    lam: float = 0.2,
    top_k: int = 20,
    ignore_index: int = opts.IGNORE_INDEX,
    shift: bool = True,
    reduction: str = "sequence_mean",
    detach_belief: bool = True,
    belief_temperature: float = 1.0,
    impl: str = "auto",
    return_stats: bool = False,
    inplace_backward: bool = False,
):
    """:func:`bs_kernels.bs_token_loss` on logits split over the vocabulary across ``group`` (Megatron style).

    Args:
        local_logits: [B, T, V_p] (or [..., V_p] with shift=False): this rank's logits for the vocabulary ids
            [vocab_start, vocab_start + V_p). The ranks' ranges must tile [0, V) (any sizes, V_p = 0 allowed).
        labels: [B, T] (or [...]) global vocabulary ids, the same on every rank.
        vocab_start: the first vocabulary id of this rank's shard.
        group: the process group over which the vocabulary is split (None: the default group).
        lam, top_k, ignore_index, shift, reduction, detach_belief, belief_temperature, impl, return_stats,
            inplace_backward: as in bs_token_loss; impl names the per-shard backend ("reference" is refused).

    Returns:
        The same loss (and BSTokenStats, with global belief ids) on every rank, equal to bs_token_loss on the
        gathered [..., V] logits; the backward writes each rank's [..., V_p] gradient without communication.
        Communication: one all_gather of the call record (RECORD_LENGTH int64) and one of N * (3 + 2 * k_pad)
        4-byte elements (8-byte for float64) per rank and call (module docstring).

    Raises:
        ValueError on every rank of the group when a rank's arguments fail a check (that rank raises its own error)
        or when the ranks disagree on the labels, batch, dtype or options (module docstring, "Requirements").
    """

    def check() -> CheckedCall:
        options = opts.loss_options(
            lam=lam,
            top_k=top_k,
            belief_temperature=belief_temperature,
            detach_belief=detach_belief,
            ignore_index=ignore_index,
            reduction=reduction,
            impl=impl,
        )
        opts.check_flags(inplace_backward=inplace_backward)
        return check_token_call(
            local_logits, labels, vocab_start, options, impl=impl, shift=shift, return_stats=return_stats
        )

    checked, shards = agree(check, local_logits, group)
    return sharded_token_loss(
        checked, shards, checked.record.options, return_stats=return_stats, inplace_backward=inplace_backward
    )


def vocab_parallel_forget_logprobs(
    local_logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_start: int,
    group=None,
    *,
    ignore_index: int = opts.IGNORE_INDEX,
    shift: bool = True,
    impl: str = "auto",
) -> torch.Tensor:
    """:func:`bs_kernels.forget_logprobs` on vocabulary-split logits (arguments as vocab_parallel_bs_token_loss).

    Communication: one all_gather of the call record and one of 3 N elements per rank (no beliefs), none in
    backward.
    """

    def check() -> CheckedCall:
        options = opts.forget_options(ignore_index=ignore_index, impl=impl)
        return check_token_call(local_logits, labels, vocab_start, options, impl=impl, shift=shift, return_stats=False)

    checked, shards = agree(check, local_logits, group)
    return sharded_token_loss(checked, shards, checked.record.options, return_stats=False, inplace_backward=False)


# ---- the fused lm_head form --------------------------------------------------------------------------------------


def _chunk_slices(num_rows: int, shards: VocabShards):
    # The chunking must be the same on every rank (one all_gather per chunk): size it by the widest shard.
    step = rows_per_chunk(num_rows, max(max(shards.sizes), 1))
    return [slice(start, start + step) for start in range(0, num_rows, step)]


class _VocabParallelLinearFunction(torch.autograd.Function):
    """Per-row values of ``hidden_rows @ local_weight.T`` over the sharded vocabulary; backward recomputes each chunk.

    Forward per chunk of rows: the shard's logits, steps 1-3 (one all_gather); saved: O(M k) statistics.
    Backward per chunk: the shard's logits again, step 4, then grad_h += g @ W_p, grad_W_p += g^T h, grad_b_p += 1^T g;
    finally one all_reduce (sum) of grad_h over the group: h is shared by every shard, so dL/dh = sum_p g_p W_p.
    """

    @staticmethod
    def forward(ctx, hidden_rows, local_weight, local_bias, rows_labels, sharded: ShardedRows):
        num_rows, device = hidden_rows.shape[0], hidden_rows.device
        stats_dtype = compute_dtype(hidden_rows.dtype)
        local_labels = shard_labels(rows_labels, sharded.shards)
        k, k_local = sharded.belief_count, sharded.local_count
        row_loss = torch.empty(num_rows, dtype=stats_dtype, device=device)
        token_logprobs, row_max, log_sum = (torch.empty_like(row_loss) for _ in range(3))
        belief_ids = torch.empty(num_rows, k, dtype=torch.int64, device=device)
        belief_probs = torch.empty(num_rows, k, dtype=stats_dtype, device=device)
        local_ids = torch.empty(num_rows, k_local, dtype=torch.int64, device=device)
        local_weights = torch.empty(num_rows, k_local, dtype=stats_dtype, device=device)
        for rows in _chunk_slices(num_rows, sharded.shards):
            logits = chunk_logits(hidden_rows[rows], local_weight, local_bias)
            chunk, local_ids[rows], local_weights[rows] = sharded.rows(logits, rows_labels[rows], local_labels[rows])
            row_loss[rows], token_logprobs[rows] = chunk.row_loss, chunk.token_logprobs
            row_max[rows], log_sum[rows] = chunk.row_max, chunk.log_sum
            belief_ids[rows], belief_probs[rows] = chunk.belief_ids, chunk.belief_probs
            del logits
        ctx.save_for_backward(
            hidden_rows, local_weight, local_bias, rows_labels, local_labels, row_max, log_sum, local_ids, local_weights
        )
        ctx.sharded = sharded
        ctx.mark_non_differentiable(token_logprobs, belief_ids, belief_probs)
        return row_loss, token_logprobs, belief_ids, belief_probs

    @staticmethod
    @first_order_only
    def backward(ctx, grad_row_loss, *unused_grads):
        hidden_rows, local_weight, local_bias, rows_labels, local_labels, row_max, log_sum, local_ids, local_weights = (
            ctx.saved_tensors
        )
        sharded = ctx.sharded
        needs_hidden, needs_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        needs_bias = local_bias is not None and ctx.needs_input_grad[2]
        accumulation = compute_dtype(local_weight.dtype)
        grad_hidden = torch.zeros_like(hidden_rows) if needs_hidden else None
        grad_weight = torch.zeros_like(local_weight, dtype=accumulation) if needs_weight else None
        grad_bias = torch.zeros_like(local_bias, dtype=accumulation) if needs_bias else None
        if sharded.shards.size > 0:
            for rows in _chunk_slices(hidden_rows.shape[0], sharded.shards):
                hidden_chunk = hidden_rows[rows]
                logits = chunk_logits(hidden_chunk, local_weight, local_bias)
                grad = sharded.grad_logits(
                    grad_row_loss[rows],
                    logits,
                    rows_labels[rows],
                    local_labels[rows],
                    row_max[rows],
                    log_sum[rows],
                    local_ids[rows],
                    local_weights[rows],
                    True,
                )
                if needs_hidden:
                    torch.mm(grad, local_weight, out=grad_hidden[rows])
                if needs_weight:
                    grad_weight.addmm_(grad.t().to(accumulation), hidden_chunk.to(accumulation))
                if needs_bias:
                    grad_bias.add_(grad.sum(0, dtype=accumulation))
                del logits, grad
        if needs_hidden:
            dist.all_reduce(grad_hidden, group=sharded.shards.group)
        if grad_weight is not None:
            grad_weight = grad_weight.to(local_weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(local_bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None


def sharded_linear_loss(
    hidden,
    local_weight,
    local_bias,
    checked: CheckedCall,
    shards: VocabShards,
    options: BSOptions,
    *,
    return_stats: bool,
):
    """bs_linear_loss with this rank's lm_head rows [V_p, H] once the ranks agree; body of the plain and DTensor
    forms."""
    rows_labels, layout = checked.rows_labels, checked.layout
    valid = rows_labels >= 0
    valid_ids = valid.nonzero().squeeze(-1)
    hidden_rows = hidden[torch.unravel_index(valid_ids, hidden.shape[:-1])]  # [M, H], ignored positions dropped
    sharded = ShardedRows(checked.backend, options, shards)
    # In the inputs' own dtype, autocast or not: the backward's recomputed chunks must match the forward's.
    with torch.autocast(hidden.device.type, enabled=False):
        row_values, token_logprobs, belief_ids, belief_probs = _VocabParallelLinearFunction.apply(
            hidden_rows, local_weight, local_bias, rows_labels.index_select(0, valid_ids), sharded
        )

    loss = reduce_rows(scatter_rows(row_values, valid), rows_labels, layout, options.reduction)
    if not return_stats:
        return loss
    outputs = RowOutputs(
        None, *(scatter_rows(values, valid) for values in (token_logprobs, belief_ids, belief_probs)), None, None, None
    )
    return loss, BSTokenStats.of_rows(layout, outputs)


def vocab_parallel_linear_loss(
    hidden: torch.Tensor,
    local_weight: torch.Tensor,
    labels: torch.Tensor,
    vocab_start: int,
    group=None,
    *,
    local_bias: torch.Tensor | None = None,
    lam: float = 0.2,
    top_k: int = 20,
    ignore_index: int = opts.IGNORE_INDEX,
    shift: bool = True,
    reduction: str = "sequence_mean",
    detach_belief: bool = True,
    belief_temperature: float = 1.0,
    impl: str = "auto",
    return_stats: bool = False,
):
    """:func:`bs_kernels.bs_linear_loss` with the lm_head split over the vocabulary (rows of the weight) across
    ``group``; never forms more than one chunk of this rank's [C, V_p] logits.

    Args:
        hidden: [B, T, H] (or [..., H] with shift=False), the same on every rank (replicated activations).
        local_weight: [V_p, H] this rank's rows of the lm_head weight, vocabulary ids [vocab_start, vocab_start + V_p).
        local_bias: optional [V_p] this rank's part of the bias.
        labels, vocab_start, group and the loss options: as in vocab_parallel_bs_token_loss (impl: the per-shard
            backend).

    Gradients: hidden's is complete (summed over the group by one all_reduce in backward), so do not all-reduce it
    again (e.g. through Megatron's copy_to_tensor_model_parallel_region); the weight's and bias's are this rank's rows.
    Communication: one all_gather of the call record, one all_gather of C * (3 + 2 * k_pad) elements per chunk in
    forward, one all_reduce of [M, H] (M = valid positions) in backward (module docstring). Errors: as
    vocab_parallel_bs_token_loss.
    """

    def check() -> CheckedCall:
        options = opts.loss_options(
            lam=lam,
            top_k=top_k,
            belief_temperature=belief_temperature,
            detach_belief=detach_belief,
            ignore_index=ignore_index,
            reduction=reduction,
            impl=impl,
        )
        return check_linear_call(
            hidden,
            local_weight,
            local_bias,
            labels,
            vocab_start,
            options,
            impl=impl,
            shift=shift,
            return_stats=return_stats,
        )

    checked, shards = agree(check, local_weight, group)
    return sharded_linear_loss(
        hidden, local_weight, local_bias, checked, shards, checked.record.options, return_stats=return_stats
    )
