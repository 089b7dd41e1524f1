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
VocabShards); this module holds the autograd Functions and the public forms.
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

import contextlib
from collections.abc import Callable
from types import ModuleType
from typing import NamedTuple

import torch
import torch.distributed as dist

from . import _options as opts
from ._chunks import chunk_logits, rows_per_chunk, scatter_rows
from ._dtypes import compute_dtype
from ._options import BSOptions
from ._rows import (
    RowLayout,
    check_floating,
    check_label_range,
    check_labels,
    check_sequence_reduction,
    reduce_rows,
    row_labels,
)
from ._vocab_call import CallRecord
from ._vocab_shards import (
    ShardedRows,
    VocabShards,
    announce_failure,
    check_vocab_start,
    record_device,
    shard_backend,
    shard_labels,
)
from .autograd import first_order_only, refuse_functorch
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


class CheckedCall(NamedTuple):
    """One rank's arguments after every check that needs no other rank (the logits or the fused form)."""

    vocab_start: int
    local_size: int
    record: CallRecord  # what the other ranks must match
    labels: torch.Tensor  # as given: their range is checked once the group's V is known
    rows_labels: torch.Tensor  # [N] int64, -1 = ignored
    layout: RowLayout
    backend: ModuleType | None  # the per-shard kernel; None for an empty shard
    rows: torch.Tensor | None = None  # the logits form's [N, V_p] rows


def agree(check: Callable[[], CheckedCall], anchor: object, group) -> tuple[CheckedCall, VocabShards]:
    """This rank's local checks, then the call's first collective (VocabShards.agreed), then the label range.

    A rank whose checks fail still takes part in that collective with a failure record, so the other ranks raise
    a ValueError quoting its message instead of waiting in an all_gather until the process group's timeout; it
    then raises its own error. ``anchor`` is the tensor beside which the record travels.
    """
    try:
        checked = check()
    except Exception as error:
        # No usable group (none initialised, a bad group argument): no rank can be waiting, this error is the news.
        with contextlib.suppress(Exception):
            announce_failure(error, group, record_device(anchor, group))
        raise
    shards = VocabShards.agreed(
        checked.vocab_start, checked.local_size, checked.record, group, record_device(anchor, group)
    )
    # Needs the group's V; the same verdict on every rank, since their labels agree (compared by checksum).
    check_label_range(checked.labels, shards.vocab_size, checked.record.options.ignore_index)
    return checked, shards


def check_local_labels(labels: torch.Tensor, ignore_index: int) -> None:
    """The part of the label range check that needs no V: no negative label other than ignore_index."""
    if labels.device.type == "meta":
        return
    negative = (labels != ignore_index) & (labels < 0)
    if bool(negative.any()):
        raise ValueError(
            f"labels contains {int(labels[negative][0])}, which is negative and is not ignore_index={ignore_index}"
        )


def check_token_call(
    local_logits, labels, vocab_start: int, options: BSOptions, *, impl: str, shift: bool, return_stats: bool
) -> CheckedCall:
    """Every check of a logits-form call that needs no other rank; the rows [N, V_p] of the shard."""
    check_floating(local_logits, "local_logits")
    opts.check_flags(shift=shift, return_stats=return_stats)
    refuse_functorch(impl)
    check_vocab_start(vocab_start)
    if local_logits.dim() < 1:
        raise ValueError(f"logits must have a vocabulary dimension, got shape {tuple(local_logits.shape)}")
    check_labels(local_logits, labels, shift=shift, name="logits")
    check_sequence_reduction(labels, shift=shift, reduction=options.reduction)
    check_local_labels(labels, options.ignore_index)
    rows_labels, layout = row_labels(labels, shift=shift, ignore_index=options.ignore_index)
    if local_logits.stride(-1) != 1:
        local_logits = local_logits.contiguous()
    local_size = local_logits.shape[-1]
    record = CallRecord("logits", local_logits.dtype, shift, 0, options, labels)
    backend = shard_backend(impl, local_logits.device, local_size)
    rows = local_logits.reshape(rows_labels.shape[0], local_size)
    return CheckedCall(vocab_start, local_size, record, labels, rows_labels, layout, backend, rows)


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


def check_linear_call(
    hidden,
    local_weight,
    local_bias,
    labels,
    vocab_start: int,
    options: BSOptions,
    *,
    impl: str,
    shift: bool,
    return_stats: bool,
) -> CheckedCall:
    """Every check of a fused-form call that needs no other rank."""
    check_floating(hidden, "hidden")
    check_floating(local_weight, "weight")
    opts.check_flags(shift=shift, return_stats=return_stats)
    refuse_functorch(impl)
    check_vocab_start(vocab_start)
    if local_weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != local_weight.shape[1]:
        raise ValueError(
            f"weight must be this rank's [V_p, H] rows of the lm_head with H = hidden's last dimension; got hidden "
            f"{tuple(hidden.shape)} and weight {tuple(local_weight.shape)}"
        )
    if hidden.dtype != local_weight.dtype or hidden.device != local_weight.device:
        raise TypeError(
            f"hidden ({hidden.dtype}, {hidden.device}) and weight ({local_weight.dtype}, "
            f"{local_weight.device}) must have the same dtype and device"
        )
    if local_bias is not None:
        check_floating(local_bias, "bias")
        if (
            local_bias.shape != local_weight.shape[:1]
            or local_bias.dtype != local_weight.dtype
            or local_bias.device != local_weight.device
        ):
            raise ValueError(
                f"bias must be [V_p] = [{local_weight.shape[0]}] of the weight's dtype and device, got "
                f"{tuple(local_bias.shape)} {local_bias.dtype} on {local_bias.device}"
            )
    check_labels(hidden, labels, shift=shift, name="hidden")
    check_sequence_reduction(labels, shift=shift, reduction=options.reduction)
    check_local_labels(labels, options.ignore_index)
    rows_labels, layout = row_labels(labels, shift=shift, ignore_index=options.ignore_index)
    local_size = local_weight.shape[0]
    record = CallRecord("lm_head", hidden.dtype, shift, hidden.shape[-1], options, labels)
    backend = shard_backend(impl, hidden.device, local_size)
    return CheckedCall(vocab_start, local_size, record, labels, rows_labels, layout, backend)


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
