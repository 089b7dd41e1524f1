"""Fused lm_head + BS-T: the loss from hidden states and the lm_head weight, never holding [N, V] logits.

bs_linear_loss(hidden, weight, labels) == bs_token_loss(hidden @ weight.T + bias, labels) in value, stats and
gradients (hidden, weight, bias), computed one chunk of rows at a time through the same logits backends
(backends/contract.py). Per chunk of C valid rows:
  1. logits = h_c @ W.T (+ b)                                  [C, V] in the input dtype (the one [C, V] buffer)
  2. raw = backend.forward(logits); rows = finish_rows(raw)    m, log_sum, z_y, top-k; row value, q, coefficients
                                                               (the epilogue, epilogue.py)
  3. g = backend.backward(w_c, logits, ..., inplace=True)      dl/dz scaled by the row weights, written over logits
  4. grad_h[c] = g @ W;   grad_W += g.T @ h_c;   grad_b += sum_c g
Step 4 is the chain rule through z = h W^T + b: dL/dh = dL/dz W, dL/dW = (dL/dz)^T h, dL/db = 1^T dL/dz.
Steps 2 and 3 are _ChunkPlan's methods: the backend and the options are fixed for the whole call. With impl="native"
they are one pass over the chunk (one_pass.py): the gradient is written over each row right after its statistics.

Two autograd Functions, chosen by the reduction:
- reduced (every reduction but "none"): the reductions are linear in the per-row values, L = sum_i w_i l_i, and the
  weights w_i depend on the labels only (one_pass.reduction_weights differentiates reduce_token_values, so the two
  cannot disagree). The gradients are therefore formed during forward (steps 1-4 once: 3 matmuls per chunk, like Liger's
  fused linear cross-entropy) and backward only multiplies them by the incoming scalar.
- rows (reduction="none", linear_forget_logprobs): the caller may weight each row arbitrarily, so forward keeps the
  per-row statistics (m, log_sum, belief ids and weights: O(N k)) and backward recomputes step 1 per chunk: 4 matmuls.
Measured side by side on a CPU at B=8, T=512, H=576, V=49152 fp32 (benchmarks/RESULTS.md), the recompute
path takes 23-29% more time than the reduced path (it holds less: no gradient is formed before backward), which
is why every reduction but "none" takes the reduced path.

Memory bound (beyond the inputs, their gradients and the [M, H] copy of the M valid hidden rows), whatever N is,
with C = max(1, CHUNK_ELEMENTS // V) rows per chunk (CUDA: a multiple of GEMM_ROW_TILE rows, and FP32_ACCUMULATOR_CHUNKS
times more rows where grad_W goes to a float32 accumulator; see _chunks.rows_per_chunk):
  one [C, V] logits chunk in the input dtype (<= CHUNK_ELEMENTS * itemsize: 128 MiB float32, 64 MiB bf16)
  + the backend's workspace on it (torch backend: one float32 workspace of at most 2^24 elements, 64 MiB)
  + on CPU with a bf16/fp16 weight, the float32 upcast of the gradient chunk (128 MiB; see _weight_grad.add_weight_grad)
  + the float32 [V, H] grad_W accumulator for a bf16/fp16 weight with accumulate_in_fp32=True (the default).
Measured at the shape above (fp32): 314-380 MiB above inputs and gradients, against 4.6 GiB for the eager path.
Ignored positions are removed before step 1, so they cost neither time nor memory.
Not done: chunking over the vocabulary too. The row chunk already bounds the temporaries, and merging top-k across
vocabulary blocks would need a second backend entry point.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from types import ModuleType

import torch

from . import _options as opts
from . import one_pass
from ._chunks import chunk_logits, row_chunks, scatter_rows
from ._dtypes import compute_dtype
from ._options import BSOptions
from ._rows import (
    check_floating,
    check_label_range,
    check_labels,
    check_sequence_reduction,
    is_dtensor,
    row_labels,
)
from ._weight_grad import GradAccumulators, accumulation_dtype
from .autograd import first_order_only, refuse_functorch
from .backends import get_backend, resolve_impl
from .epilogue import BSTokenStats, RowOutputs, backward_rows, finish_rows
from .loss import bs_token_loss, forget_logprobs


@dataclass(frozen=True)
class _ChunkPlan:
    """What every logits chunk goes through (steps 2 and 3): one backend, one set of options, one grad_W dtype."""

    backend: ModuleType
    options: BSOptions
    accumulation_dtype: torch.dtype  # of grad_W and grad_b across chunks

    def rows(self, logits: torch.Tensor, labels: torch.Tensor) -> RowOutputs:
        """Step 2 on a [C, V] chunk with labels [C]."""
        raw = self.backend.forward(logits, labels, self.options.belief_count(logits.shape[-1]))
        return finish_rows(raw, labels, self.options)

    def rows_and_grad(self, logits, labels, grad_rows) -> tuple[RowOutputs, torch.Tensor]:
        """Steps 2 and 3 with dL/dz written over the chunk's logits: in one pass over the chunk where the backend
        can (impl="native": one_pass.forward_with_grad), else forward then backward."""
        if one_pass.has_forward_grad(self.backend):
            return one_pass.forward_with_grad(self.backend, logits, labels, grad_rows, self.options, inplace=True)
        rows = self.rows(logits, labels)
        grad_logits = self.grad_logits(
            grad_rows, logits, labels, rows.row_max, rows.log_sum, rows.belief_ids, rows.belief_weights
        )
        return rows, grad_logits

    def grad_logits(self, grad_rows, logits, labels, row_max, log_sum, belief_ids, belief_weights) -> torch.Tensor:
        """Step 3: dL/dz_i = grad_rows[i] * dl_i/dz_i for a [C, V] chunk, written over the chunk's logits."""
        grad_rows, row_max = backward_rows(grad_rows, labels, row_max)  # NaN rows for logits without a distribution
        return self.backend.backward(
            grad_rows, logits, labels, row_max, log_sum, belief_ids, belief_weights, self.options.label_weight, True
        )


class _RowStore:
    """Per-row outputs of all chunks: row values, token log-probs, belief ids and probs ([M] and [M, k])."""

    def __init__(self, num_rows: int, top_k: int, dtype: torch.dtype, device: torch.device) -> None:
        self.row_loss = torch.empty(num_rows, dtype=dtype, device=device)
        self.token_logprobs = torch.empty(num_rows, dtype=dtype, device=device)
        self.belief_ids = torch.empty(num_rows, top_k, dtype=torch.int64, device=device)
        self.belief_probs = torch.empty(num_rows, top_k, dtype=dtype, device=device)
        self.row_max = torch.empty(num_rows, dtype=dtype, device=device)
        self.log_sum = torch.empty(num_rows, dtype=dtype, device=device)
        self.belief_weights = torch.empty(num_rows, top_k, dtype=dtype, device=device)

    def put(self, rows: slice, chunk: RowOutputs) -> None:
        self.row_loss[rows] = chunk.row_loss
        self.token_logprobs[rows] = chunk.token_logprobs
        self.belief_ids[rows] = chunk.belief_ids
        self.belief_probs[rows] = chunk.belief_probs
        self.row_max[rows] = chunk.row_max
        self.log_sum[rows] = chunk.log_sum
        self.belief_weights[rows] = chunk.belief_weights


class _ReducedLinearFunction(torch.autograd.Function):
    """L = sum_i row_weights[i] * l_i over the valid rows; gradients formed in forward, scaled in backward."""

    @staticmethod
    def forward(
        ctx,
        hidden_rows: torch.Tensor,  # [M, H] valid rows only
        weight: torch.Tensor,  # [V, H]
        bias: torch.Tensor | None,  # [V]
        labels: torch.Tensor,  # [M] int64, all >= 0
        row_weights: torch.Tensor,  # [M] dL/dl_i of the reduction (compute dtype)
        plan: _ChunkPlan,
        needs_grads: tuple[bool, bool, bool],  # (hidden, weight, bias); decided by the caller (grad mode)
    ):
        num_rows, vocab_size = hidden_rows.shape[0], weight.shape[0]
        store = _RowStore(num_rows, plan.options.belief_count(vocab_size), row_weights.dtype, hidden_rows.device)
        grads = GradAccumulators(hidden_rows, weight, bias, plan.accumulation_dtype, *needs_grads)
        widened = needs_grads[1] and plan.accumulation_dtype != weight.dtype
        for rows in row_chunks(num_rows, vocab_size, hidden_rows.device, widened):
            hidden_chunk = hidden_rows[rows]
            logits = chunk_logits(hidden_chunk, weight, bias)
            if any(needs_grads):
                # dL/dz_i = w_i * dl_i/dz_i: the contract's backward with grad_rows = w.
                chunk, grad_logits = plan.rows_and_grad(logits, labels[rows], row_weights[rows].contiguous())
                grads.add_chunk(rows, grad_logits, hidden_chunk, weight)
            else:
                chunk = plan.rows(logits, labels[rows])
            store.put(rows, chunk)
            del logits
        loss = torch.dot(row_weights, store.row_loss)
        grad_hidden, grad_weight, grad_bias = grads.results(weight, bias)
        ctx.grad_hidden, ctx.grad_weight, ctx.grad_bias = grad_hidden, grad_weight, grad_bias
        ctx.mark_non_differentiable(store.token_logprobs, store.belief_ids, store.belief_probs)
        return loss, store.token_logprobs, store.belief_ids, store.belief_probs

    @staticmethod
    @first_order_only
    def backward(ctx, grad_loss, *unused_grads):
        # L's gradients were formed in forward for dL/dL = 1; the chain rule only scales them by the incoming scalar.
        def scaled(grad):
            if grad is None:
                return None
            return grad if bool(grad_loss == 1) else grad * grad_loss.to(grad.dtype)

        grad_hidden, grad_weight, grad_bias = scaled(ctx.grad_hidden), scaled(ctx.grad_weight), scaled(ctx.grad_bias)
        ctx.grad_hidden = ctx.grad_weight = ctx.grad_bias = None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


class _RowsLinearFunction(torch.autograd.Function):
    """Per-row values l_i (differentiable for any downstream use); backward recomputes each logits chunk."""

    @staticmethod
    def forward(
        ctx,
        hidden_rows: torch.Tensor,  # [M, H] valid rows only
        weight: torch.Tensor,  # [V, H]
        bias: torch.Tensor | None,  # [V]
        labels: torch.Tensor,  # [M] int64, all >= 0
        plan: _ChunkPlan,
    ):
        num_rows, vocab_size = hidden_rows.shape[0], weight.shape[0]
        top_k = plan.options.belief_count(vocab_size)
        store = _RowStore(num_rows, top_k, compute_dtype(hidden_rows.dtype), hidden_rows.device)
        for rows in row_chunks(num_rows, vocab_size, hidden_rows.device):
            logits = chunk_logits(hidden_rows[rows], weight, bias)
            store.put(rows, plan.rows(logits, labels[rows]))
            del logits
        ctx.save_for_backward(
            hidden_rows, weight, bias, labels, store.row_max, store.log_sum, store.belief_ids, store.belief_weights
        )
        ctx.plan = plan
        ctx.mark_non_differentiable(store.token_logprobs, store.belief_ids, store.belief_probs)
        return store.row_loss, store.token_logprobs, store.belief_ids, store.belief_probs

    @staticmethod
    @first_order_only
    def backward(ctx, grad_row_loss, *unused_grads):
        hidden_rows, weight, bias, labels, row_max, log_sum, belief_ids, belief_weights = ctx.saved_tensors
        needs_hidden, needs_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        needs_bias = bias is not None and ctx.needs_input_grad[2]
        plan = ctx.plan
        grads = GradAccumulators(
            hidden_rows, weight, bias, plan.accumulation_dtype, needs_hidden, needs_weight, needs_bias
        )
        grad_rows = grad_row_loss.to(row_max.dtype).contiguous()
        # The recomputed chunk must match forward's: no autocast (forward ran with it off, on already-cast inputs).
        with gathered_parameter(weight), torch.autocast(hidden_rows.device.type, enabled=False):
            widened = needs_weight and plan.accumulation_dtype != weight.dtype
            for rows in row_chunks(hidden_rows.shape[0], weight.shape[0], hidden_rows.device, widened):
                hidden_chunk = hidden_rows[rows]
                logits = chunk_logits(hidden_chunk, weight, bias)
                grad_logits = plan.grad_logits(
                    grad_rows[rows],
                    logits,
                    labels[rows],
                    row_max[rows],
                    log_sum[rows],
                    belief_ids[rows],
                    belief_weights[rows],
                )
                grads.add_chunk(rows, grad_logits, hidden_chunk, weight)
                del logits, grad_logits
        grad_hidden, grad_weight, grad_bias = grads.results(weight, bias)
        return grad_hidden, grad_weight, grad_bias, None, None


def gathered_parameter(weight: torch.Tensor):
    """A context in which a DeepSpeed ZeRO-3 partitioned parameter holds its full value; a no-op for anything else.

    deepspeed is imported only for tensors that carry ZeRO-3's ``ds_id`` marker, so this costs nothing elsewhere.
    """
    if not hasattr(weight, "ds_id"):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([weight], modifier_rank=None)


def _check_linear_inputs(hidden, weight, bias, labels, shift: bool, ignore_index: int) -> None:
    check_floating(hidden, "hidden")
    check_floating(weight, "weight")
    if weight.dim() != 2 or weight.shape[0] == 0:
        raise ValueError(f"weight must be [V, H] with V >= 1, got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden's last dimension must equal weight's H = {weight.shape[1]}; got hidden {tuple(hidden.shape)} "
            f"and weight {tuple(weight.shape)}"
        )
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if bias is not None:
        check_floating(bias, "bias")
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got shape {tuple(bias.shape)}")
        if bias.dtype != weight.dtype or bias.device != weight.device:
            raise TypeError(f"bias ({bias.dtype}, {bias.device}) must match weight ({weight.dtype}, {weight.device})")
    check_labels(hidden, labels, shift=shift, name="hidden")
    check_label_range(labels, weight.shape[0], ignore_index)


def _autocast(hidden, weight, bias):
    """Under torch.autocast the lm_head GEMM would run in the autocast dtype; do the same (differentiable casts)."""
    device_type = hidden.device.type
    if not torch.is_autocast_enabled(device_type):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def _linear_rows(hidden, weight, bias, labels, *, shift: bool, impl: str, options: BSOptions, accumulate_in_fp32: bool):
    """Shared body of bs_linear_loss and linear_forget_logprobs: (loss or per-position values, stats)."""
    _check_linear_inputs(hidden, weight, bias, labels, shift, options.ignore_index)
    refuse_functorch(impl)
    hidden, weight, bias = _autocast(hidden, weight, bias)
    rows_labels, layout = row_labels(labels, shift=shift, ignore_index=options.ignore_index)
    valid = rows_labels >= 0  # [N]
    valid_ids = valid.nonzero().squeeze(-1)
    # The valid rows of hidden, gathered from any strides: a non-contiguous view is read in place, never copied whole.
    hidden_rows = hidden[torch.unravel_index(valid_ids, hidden.shape[:-1])]  # [M, H]
    valid_labels = rows_labels.index_select(0, valid_ids)  # [M]
    backend = get_backend(resolve_impl(impl, hidden.device), hidden.device)
    plan = _ChunkPlan(backend, options, accumulation_dtype(weight.dtype, accumulate_in_fp32))

    # Inputs are already in the autocast dtype (_autocast); the chunk GEMMs and statistics must not be recast.
    no_autocast = torch.autocast(hidden.device.type, enabled=False)
    if options.reduction == "none":
        with no_autocast:
            row_values, token_logprobs, belief_ids, belief_probs = _RowsLinearFunction.apply(
                hidden_rows, weight, bias, valid_labels, plan
            )
        result = layout.unflatten(scatter_rows(row_values, valid))
    else:
        row_weights = one_pass.reduction_weights(rows_labels, layout, options.reduction, compute_dtype(hidden.dtype))
        grad_mode = torch.is_grad_enabled()
        needs_grads = (
            grad_mode and hidden.requires_grad,
            grad_mode and weight.requires_grad,
            grad_mode and bias is not None and bias.requires_grad,
        )
        with no_autocast:
            result, token_logprobs, belief_ids, belief_probs = _ReducedLinearFunction.apply(
                hidden_rows, weight, bias, valid_labels, row_weights.index_select(0, valid_ids), plan, needs_grads
            )
    stats = BSTokenStats(
        token_logprobs=layout.unflatten(scatter_rows(token_logprobs, valid)),
        belief_ids=layout.unflatten(scatter_rows(belief_ids, valid)),
        belief_probs=layout.unflatten(scatter_rows(belief_probs, valid)),
    )
    return result, stats


def _materialised_logits(hidden, weight, bias):
    """The eager path, exactly as an nn.Linear lm_head forms the logits."""
    return torch.nn.functional.linear(hidden, weight, bias)


def bs_linear_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    lam: float = 0.2,
    top_k: int = 20,
    ignore_index: int = opts.IGNORE_INDEX,
    shift: bool = True,
    reduction: str = "sequence_mean",
    detach_belief: bool = True,
    belief_temperature: float = 1.0,
    impl: str = "auto",
    return_stats: bool = False,
    accumulate_in_fp32: bool = True,
):
    """BS-T loss of ``logits = hidden @ weight.T + bias`` without ever forming the [N, V] logits.

    Same value, stats and reductions as ``bs_token_loss(hidden @ weight.T + bias, labels, ...)``, with gradients for
    hidden, weight and bias (whichever require grad; a frozen or tied weight works as is).

    Args:
        hidden: [B, T, H] final hidden states (shift=True), or [..., H] with labels [...] (shift=False); any strides.
        weight: [V, H] the lm_head (or tied input embedding) weight, same dtype and device as hidden.
        labels: [B, T] (or [...]) integer ids, ``ignore_index`` where a position does not count. Ignored positions
            are dropped before the matmul.
        bias: optional [V] lm_head bias.
        lam, top_k, ignore_index, shift, reduction, detach_belief, belief_temperature, return_stats: as in
            :func:`bs_kernels.bs_token_loss`.
        impl: the logits backend run on each chunk ("auto", "torch", "native", "triton"), or "reference" to form the
            logits explicitly and call the reference loss (the eager baseline; O(N V) memory).
        accumulate_in_fp32: for bf16/fp16 weights, sum grad_weight (and grad_bias) over the row chunks in a float32
            buffer (default: the most accurate, but 4 V H bytes, 2 GiB at V = 128 256, H = 4 096). False adds each
            chunk's GEMM straight into a gradient of the weight's dtype (one rounding per chunk, like Liger-Kernel's
            default), which keeps the extra memory to the logits chunk. No effect for float32/float64 weights.

    Memory: one chunk of C = CHUNK_ELEMENTS // V rows of logits at a time (see the module docstring for the bound,
    independent of N), plus the float32 [V, H] accumulator for bf16/fp16 weights with accumulate_in_fp32.
    Time: 3 GEMMs per chunk (the gradients are formed in forward) except for reduction="none", which recomputes the
    logits in backward (4 GEMMs).

    Under torch.compile the chunk loop (data-dependent row selection, gradients formed in forward) cannot be traced,
    so a compiled region computes ``bs_token_loss(F.linear(hidden, weight, bias), labels, ...)`` with the same impl
    instead: the same values and gradients, traceable with ``fullgraph=True``, but the [N, V] logits are formed
    (and ``accumulate_in_fp32`` has nothing to accumulate). Call it outside the compiled region to keep the bound.

    Returns:
        The reduced loss (float32; float64 for float64 inputs), per position for reduction="none", and a
        BSTokenStats when ``return_stats``.
    """

    def checked_options() -> BSOptions:
        options = opts.loss_options(
            lam=lam,
            top_k=top_k,
            belief_temperature=belief_temperature,
            detach_belief=detach_belief,
            ignore_index=ignore_index,
            reduction=reduction,
            impl=impl,
        )
        opts.check_flags(shift=shift, return_stats=return_stats, accumulate_in_fp32=accumulate_in_fp32)
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
        check_sequence_reduction(labels, shift=shift, reduction=reduction)
        return options

    # An lm_head sharded over the vocabulary (tensor parallelism): bs_kernels/dtensor.py, before any check, which it
    # runs on every rank at once (a rank failing here alone would leave the others waiting in the first collective).
    if is_dtensor(weight):
        from .dtensor import dtensor_linear_loss

        return dtensor_linear_loss(
            hidden, weight, bias, labels, checked_options, impl=impl, shift=shift, return_stats=return_stats
        )
    options = checked_options()
    if impl == "reference" or torch.compiler.is_compiling():
        _check_linear_inputs(hidden, weight, bias, labels, shift, ignore_index)
        return bs_token_loss(
            _materialised_logits(hidden, weight, bias),
            labels,
            lam=lam,
            top_k=top_k,
            ignore_index=ignore_index,
            shift=shift,
            reduction=reduction,
            detach_belief=detach_belief,
            belief_temperature=belief_temperature,
            impl=impl,
            return_stats=return_stats,
        )
    loss, stats = _linear_rows(
        hidden, weight, bias, labels, shift=shift, impl=impl, options=options, accumulate_in_fp32=accumulate_in_fp32
    )
    return (loss, stats) if return_stats else loss


def linear_forget_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = opts.IGNORE_INDEX,
    shift: bool = True,
    impl: str = "auto",
) -> torch.Tensor:
    """Per-token log p(label) of ``hidden @ weight.T + bias`` without forming the logits; 0 where ignored.

    Shape: that of the (shifted) labels; float32 (float64 for float64 inputs); differentiable w.r.t. hidden, weight
    and bias (the backward recomputes each logits chunk, so any downstream use of the values works: GA, NPO, ...).
    Under torch.compile the logits are formed, as for :func:`bs_linear_loss`.
    """

    def checked_options() -> BSOptions:
        options = opts.forget_options(ignore_index=ignore_index, impl=impl)
        opts.check_flags(shift=shift)
        return options

    if is_dtensor(weight):  # sharded over the vocabulary: bs_kernels/dtensor.py (it runs the checks, as above)
        from .dtensor import dtensor_linear_loss

        return dtensor_linear_loss(
            hidden, weight, bias, labels, checked_options, impl=impl, shift=shift, return_stats=False
        )
    options = checked_options()
    if impl == "reference" or torch.compiler.is_compiling():
        _check_linear_inputs(hidden, weight, bias, labels, shift, ignore_index)
        return forget_logprobs(
            _materialised_logits(hidden, weight, bias), labels, ignore_index=ignore_index, shift=shift, impl=impl
        )
    values, _ = _linear_rows(
        hidden, weight, bias, labels, shift=shift, impl=impl, options=options, accumulate_in_fp32=True
    )
    return values
