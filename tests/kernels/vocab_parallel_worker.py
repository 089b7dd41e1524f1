"""Worker of tests/kernels/test_vocab_parallel.py: every vocabulary-parallel case, run inside one gloo process group.

The test module starts the processes once per group size (torch.multiprocessing, spawn) and each process runs every
case of CASES, recording per case None (passed) or the failure's traceback in a JSON file per rank; the tests then
read those files. Every case compares the sharded computation with the single-process one on the gathered (full)
logits, with the same backend, within tests/conftest.py's TOLERANCES (passed in by the test module).
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import os
import time
import traceback

import torch
import torch.distributed as dist

import bs_kernels
from bs_kernels import bs_linear_loss, bs_token_loss, forget_logprobs, linear_forget_logprobs
from bs_kernels._vocab_call import RECORD_LENGTH
from bs_kernels.vocab_parallel import (
    vocab_parallel_bs_token_loss,
    vocab_parallel_forget_logprobs,
    vocab_parallel_linear_loss,
)

REDUCTIONS = ("sequence_mean", "token_mean", "sum", "none")
RECORD_BYTES = 8 * RECORD_LENGTH  # the call record every call gathers first (bs_kernels/_vocab_call.py)
DTYPES = (torch.float32, torch.float64)
VOCAB = 11  # not divisible by 2 or 4: shards of 6, 5 and of 3, 3, 3, 2


class Context:
    def __init__(self, rank: int, world: int, impls: list[str], tolerances: dict) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        self.rank, self.world, self.impls, self.tolerances = rank, world, impls, tolerances
        self.mesh = init_device_mesh("cpu", (world,))

    def close(self, actual, expected, what: str) -> None:
        tolerance = self.tolerances["float64" if expected.dtype == torch.float64 else "float32"]
        torch.testing.assert_close(actual, expected, **tolerance, msg=lambda m: f"{what}: {m}")

    def weight_dtensor(self, local: torch.Tensor, full: torch.Tensor):
        """This rank's rows of an lm_head weight (or bias) as a DTensor sharded Shard(0), like ColwiseParallel's."""
        from torch.distributed.tensor import DTensor, Shard

        return DTensor.from_local(local, self.mesh, [Shard(0)], run_check=False, shape=full.shape, stride=full.stride())

    def even_range(self, vocab: int) -> slice:
        chunk = -(-vocab // self.world)
        start = min(self.rank * chunk, vocab)
        return slice(start, min(start + chunk, vocab))


def make_case(dtype, *, vocab: int = VOCAB, batch: int = 3, length: int = 6, seed: int = 0, masked: bool = False):
    """Logits [B, T, V] (the same on every rank) and labels [B, T]: a prompt of 2 ignored labels, sequence 1 fully
    ignored, and the other labels spread over every id (so over every shard)."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, vocab, generator=generator, dtype=torch.float64) * 3
    labels = (torch.arange(batch * length).reshape(batch, length) * 7) % vocab
    labels[:, :2] = -100
    labels[1] = -100
    if masked:
        # Half the vocabulary at -inf (labels kept finite), row 0 with only its label finite, and every logit of the
        # ignored sequence -inf; some rows then have a whole shard at -inf.
        next_labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
        drop = torch.rand(logits.shape, generator=generator) < 0.5
        drop[0, :, :] = True
        drop.scatter_(-1, next_labels.clamp(min=0).unsqueeze(-1), next_labels.unsqueeze(-1) < 0)
        drop[1] = True
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.to(dtype), labels


def upstream_weights(loss: torch.Tensor) -> torch.Tensor:
    return torch.linspace(1.0, 2.0, loss.numel(), dtype=loss.dtype).reshape(loss.shape)


def sorted_beliefs(stats):
    """Belief (ids, probs) sorted by id, ids with q = 0 (ties of -inf, any may be picked) replaced by -1."""
    ids = torch.where(stats.belief_probs > 0, stats.belief_ids, -1)
    ids, order = ids.sort(-1)
    return ids, stats.belief_probs.gather(-1, order)


def compare_logits_loss(
    ctx: Context, logits, labels, *, form: str, impl: str, shards: list[int] | None = None, **options
):
    """bs_token_loss on a vocabulary shard (form "dtensor" or "plain") against the full logits: loss, stats, grad."""
    full = logits.clone().requires_grad_(True)
    expected, expected_stats = bs_token_loss(full, labels, impl=impl, return_stats=True, **options)
    (expected_grad,) = torch.autograd.grad((expected * upstream_weights(expected)).sum(), full)

    if shards is None:
        columns = ctx.even_range(logits.shape[-1])
    else:  # an explicit tiling (plain form only): rank p holds shards[p] ids after those of the ranks before it
        start = sum(shards[: ctx.rank])
        columns = slice(start, start + shards[ctx.rank])
    local = logits[..., columns].clone().requires_grad_(True)
    if form == "dtensor":
        from torch.distributed.tensor import DTensor, Shard

        sharded = DTensor.from_local(
            local, ctx.mesh, [Shard(-1)], run_check=False, shape=logits.shape, stride=logits.stride()
        )
        actual, stats = bs_token_loss(sharded, labels, impl=impl, return_stats=True, **options)
    else:
        actual, stats = vocab_parallel_bs_token_loss(
            local, labels, columns.start, impl=impl, return_stats=True, **options
        )
    (grad,) = torch.autograd.grad((actual * upstream_weights(actual)).sum(), local)
    ctx.close(actual, expected.detach(), "loss")
    ctx.close(grad, expected_grad[..., columns], "gradient")
    ctx.close(stats.token_logprobs, expected_stats.token_logprobs, "token_logprobs")
    vocab = logits.shape[-1]
    assert bool(((stats.belief_ids >= 0) & (stats.belief_ids < vocab)).all()), "a belief id outside [0, V)"
    ids, probs = sorted_beliefs(stats)
    expected_ids, expected_probs = sorted_beliefs(expected_stats)
    torch.testing.assert_close(ids, expected_ids, rtol=0, atol=0, msg=lambda m: f"belief ids: {m}")
    ctx.close(probs, expected_probs, "belief probs")


def case_reductions_and_options(ctx: Context) -> None:
    """Every reduction, detached and attached beliefs, temperature 1 and 0.5, both dtypes, both entry points."""
    for impl, dtype, reduction, detach, temperature, form in itertools.product(
        ctx.impls, DTYPES, REDUCTIONS, (True, False), (1.0, 0.5), ("dtensor", "plain")
    ):
        logits, labels = make_case(dtype)
        compare_logits_loss(
            ctx,
            logits,
            labels,
            form=form,
            impl=impl,
            lam=0.4,
            top_k=4,
            reduction=reduction,
            detach_belief=detach,
            belief_temperature=temperature,
        )


def case_top_k_beyond_a_shard(ctx: Context) -> None:
    """k larger than one shard (and k >= V: the whole vocabulary is the belief set)."""
    shard = -(-VOCAB // ctx.world)
    for impl, dtype, top_k, detach in itertools.product(ctx.impls, DTYPES, (shard + 2, 50), (True, False)):
        logits, labels = make_case(dtype, seed=1)
        compare_logits_loss(ctx, logits, labels, form="dtensor", impl=impl, lam=0.5, top_k=top_k, detach_belief=detach)


def case_minus_inf_logits(ctx: Context) -> None:
    """-inf logits, rows with a whole shard at -inf, a fully -inf ignored sequence; no NaN, same values."""
    for impl, dtype, detach, top_k in itertools.product(ctx.impls, DTYPES, (True, False), (3, 50)):
        logits, labels = make_case(dtype, seed=2, masked=True)
        compare_logits_loss(
            ctx, logits, labels, form="plain", impl=impl, lam=0.3, top_k=top_k, detach_belief=detach, reduction="none"
        )


def case_non_finite_counted_rows(ctx: Context) -> None:
    """Counted rows with no distribution (every logit -inf; one NaN logit on the last shard) give a NaN value and a
    NaN gradient row on every shard, as on one process (README "Non-finite logits"); the other rows are unaffected."""
    for impl, dtype, detach in itertools.product(ctx.impls, DTYPES, (True, False)):
        logits, labels = make_case(dtype, seed=4)
        logits[0, 2] = float("-inf")  # predicts labels[0, 3], a counted position
        logits[2, 3, -1] = float("nan")  # predicts labels[2, 4]
        full = logits.clone().requires_grad_(True)
        expected = bs_token_loss(full, labels, impl=impl, lam=0.3, top_k=3, detach_belief=detach, reduction="none")
        (expected_grad,) = torch.autograd.grad((expected * upstream_weights(expected)).nan_to_num().sum(), full)
        columns = ctx.even_range(logits.shape[-1])
        local = logits[..., columns].clone().requires_grad_(True)
        actual = vocab_parallel_bs_token_loss(
            local, labels, columns.start, impl=impl, lam=0.3, top_k=3, detach_belief=detach, reduction="none"
        )
        (grad,) = torch.autograd.grad((actual * upstream_weights(actual)).nan_to_num().sum(), local)
        assert bool(actual[0, 2].isnan()) and bool(actual[2, 3].isnan()), actual
        assert bool(grad[0, 2].isnan().all()) and bool(grad[2, 3].isnan().all()), "a no-distribution row's gradient"
        tolerance = ctx.tolerances["float64" if dtype == torch.float64 else "float32"]
        torch.testing.assert_close(actual, expected.detach(), equal_nan=True, **tolerance)
        torch.testing.assert_close(grad, expected_grad[..., columns], equal_nan=True, **tolerance)


def case_uneven_and_empty_shards(ctx: Context) -> None:
    """Any contiguous tiling (plain form), an empty shard included; DTensor's split of V = 3 over the group."""
    tilings = {2: [[0, VOCAB], [10, 1]], 4: [[4, 0, 5, 2], [1, 1, 1, 8]]}[ctx.world]
    for impl, dtype, shards in itertools.product(ctx.impls, DTYPES, tilings):
        logits, labels = make_case(dtype, seed=3)
        compare_logits_loss(ctx, logits, labels, form="plain", impl=impl, shards=shards, lam=0.2, top_k=4)
        logits, labels = make_case(dtype, vocab=3, seed=3)  # DTensor: (2, 1) over 2 ranks, (1, 1, 1, 0) over 4
        compare_logits_loss(ctx, logits, labels, form="dtensor", impl=impl, lam=0.2, top_k=2)


def case_flat_rows_and_inplace(ctx: Context) -> None:
    """shift=False on flat [N, V] rows; inplace_backward (the shard's storage receives its gradient)."""
    for impl, dtype in itertools.product(ctx.impls, DTYPES):
        logits, labels = make_case(dtype, seed=4)
        flat_logits, flat_labels = logits.reshape(-1, VOCAB), labels.reshape(-1)
        compare_logits_loss(
            ctx, flat_logits, flat_labels, form="plain", impl=impl, shift=False, reduction="token_mean", top_k=3
        )
        columns = ctx.even_range(VOCAB)
        local = logits[..., columns].clone().requires_grad_(True)
        expected = vocab_parallel_bs_token_loss(local, labels, columns.start, impl=impl)
        (expected_grad,) = torch.autograd.grad(expected, local)
        scratch = logits[..., columns].clone().requires_grad_(True)
        inplace = vocab_parallel_bs_token_loss(scratch * 1, labels, columns.start, impl=impl, inplace_backward=True)
        (grad,) = torch.autograd.grad(inplace, scratch)
        ctx.close(inplace, expected, "inplace loss")
        ctx.close(grad, expected_grad, "inplace gradient")


def case_forget_logprobs(ctx: Context) -> None:
    """forget_logprobs on both entry points: per-token log p(label) and its gradient e_y - pi."""
    from torch.distributed.tensor import DTensor, Shard

    for impl, dtype, masked in itertools.product(ctx.impls, DTYPES, (False, True)):
        logits, labels = make_case(dtype, seed=5, masked=masked)
        full = logits.clone().requires_grad_(True)
        expected = forget_logprobs(full, labels, impl=impl)
        (expected_grad,) = torch.autograd.grad((expected * upstream_weights(expected)).sum(), full)
        columns = ctx.even_range(VOCAB)
        for form in ("dtensor", "plain"):
            local = logits[..., columns].clone().requires_grad_(True)
            if form == "dtensor":
                sharded = DTensor.from_local(
                    local, ctx.mesh, [Shard(-1)], run_check=False, shape=logits.shape, stride=logits.stride()
                )
                actual = forget_logprobs(sharded, labels, impl=impl)
            else:
                actual = vocab_parallel_forget_logprobs(local, labels, columns.start, impl=impl)
            (grad,) = torch.autograd.grad((actual * upstream_weights(actual)).sum(), local)
            ctx.close(actual, expected.detach(), f"{form} forget log-probs")
            ctx.close(grad, expected_grad[..., columns], f"{form} forget log-prob gradient")


@contextlib.contextmanager
def counted_collectives():
    """Record (name, bytes sent by this rank) of every torch.distributed collective called inside the block."""
    calls = []
    names = (
        "all_gather_single",
        "all_gather_into_tensor",
        "all_gather",
        "all_reduce",
        "broadcast",
        "reduce_scatter",
        "reduce_scatter_tensor",
        "all_to_all",
        "all_to_all_single",
    )
    originals = {name: getattr(dist, name) for name in names if hasattr(dist, name)}

    def counting(name, original):
        def wrapper(*args, **kwargs):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            sent = tensors[1] if name in ("all_gather_single", "all_gather_into_tensor") else tensors[0]
            calls.append((name, sent.numel() * sent.element_size()))
            return original(*args, **kwargs)

        return wrapper

    import bs_kernels._vocab_shards as vocab_shards

    gather_before = vocab_shards.all_gather_single
    for name, original in originals.items():
        setattr(dist, name, counting(name, original))
    vocab_shards.all_gather_single = counting("all_gather_single", gather_before)
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
        vocab_shards.all_gather_single = gather_before


def case_communication_volume(ctx: Context) -> None:
    """The bytes of the module docstring, exactly: the call record, then N (3 + 2 k_pad) elements per call, nothing
    in backward."""
    impl = ctx.impls[0]
    for dtype, top_k in itertools.product(DTYPES, (3, 50)):  # k = 3: 3 + 2 k < V = 11, less than the logits
        logits, labels = make_case(dtype, seed=6)
        num_rows, element = labels.numel(), 8 if dtype == torch.float64 else 4
        shard = -(-VOCAB // ctx.world)
        padded = min(top_k, shard)
        columns = ctx.even_range(VOCAB)
        local = logits[..., columns].clone().requires_grad_(True)
        with counted_collectives() as forward_calls:
            loss = vocab_parallel_bs_token_loss(local, labels, columns.start, impl=impl, top_k=top_k)
        with counted_collectives() as backward_calls:
            loss.backward()
        expected = [("all_gather_single", RECORD_BYTES), ("all_gather_single", num_rows * (3 + 2 * padded) * element)]
        assert forward_calls == expected, f"forward collectives {forward_calls}, expected {expected}"
        assert backward_calls == [], f"backward communicated: {backward_calls}"
        assert num_rows * (3 + 2 * padded) < num_rows * VOCAB or top_k >= VOCAB


def case_fused_linear_chunks_and_communication(ctx: Context) -> None:
    """The fused form over several row chunks (4 rows each) equals one chunk, with one all_gather of
    C (3 + 2 k_pad) elements per chunk in forward and one all_reduce of the [M, H] hidden gradient in backward."""
    import bs_kernels.vocab_parallel as vocab_parallel

    columns = ctx.even_range(VOCAB)
    for dtype in DTYPES:
        hidden, weight, bias, labels = linear_case(dtype, seed=9)
        options = dict(lam=0.3, top_k=3, impl=ctx.impls[0], local_bias=bias[columns])
        one_chunk = vocab_parallel_linear_loss(hidden, weight[columns], labels, columns.start, **options)
        inputs = [hidden.clone().requires_grad_(True), weight[columns].clone().requires_grad_(True)]
        full_size = vocab_parallel.rows_per_chunk
        vocab_parallel.rows_per_chunk = lambda num_rows, vocab_size: 4
        try:
            with counted_collectives() as forward_calls:
                loss = vocab_parallel_linear_loss(*inputs, labels, columns.start, **options)
            with counted_collectives() as backward_calls:
                loss.backward()
        finally:
            vocab_parallel.rows_per_chunk = full_size
        ctx.close(loss.detach(), one_chunk, "loss over 4-row chunks")
        element = 8 if dtype == torch.float64 else 4
        valid_rows = int((labels[:, 1:] != -100).sum())  # shift=True: position t predicts label t + 1
        chunk_rows = [min(4, valid_rows - start) for start in range(0, valid_rows, 4)]
        padded = min(3, -(-VOCAB // ctx.world))
        expected = [("all_gather_single", RECORD_BYTES)] + [
            ("all_gather_single", rows * (3 + 2 * padded) * element) for rows in chunk_rows
        ]
        assert forward_calls == expected, f"forward collectives {forward_calls}, expected {expected}"
        expected_backward = [("all_reduce", valid_rows * hidden.shape[-1] * element)]
        assert backward_calls == expected_backward, f"backward collectives {backward_calls}, {expected_backward}"


def linear_case(dtype, seed: int = 7, hidden_size: int = 8):
    generator = torch.Generator().manual_seed(seed)
    _, labels = make_case(dtype, seed=seed)
    hidden = torch.randn(*labels.shape, hidden_size, generator=generator, dtype=torch.float64)
    weight = torch.randn(VOCAB, hidden_size, generator=generator, dtype=torch.float64)
    bias = torch.randn(VOCAB, generator=generator, dtype=torch.float64)
    return hidden.to(dtype), weight.to(dtype), bias.to(dtype), labels


def case_fused_linear(ctx: Context) -> None:
    """bs_linear_loss with the lm_head's rows sharded (plain form and DTensor Shard(0) weight and bias) against the
    unsharded fused loss: values, stats and the gradients of hidden (complete on every rank), weight and bias rows."""
    columns = ctx.even_range(VOCAB)
    for impl, dtype, reduction, detach, form in itertools.product(
        ctx.impls, DTYPES, ("sequence_mean", "none"), (True, False), ("dtensor", "plain")
    ):
        hidden, weight, bias, labels = linear_case(dtype)
        options = dict(lam=0.4, top_k=ctx.world + 3, reduction=reduction, detach_belief=detach, impl=impl)
        inputs = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
        expected, expected_stats = bs_linear_loss(
            inputs[0], inputs[1], labels, bias=inputs[2], return_stats=True, **options
        )
        expected_grads = torch.autograd.grad((expected * upstream_weights(expected)).sum(), inputs)

        local_hidden = hidden.clone().requires_grad_(True)
        local_weight = weight[columns].clone().requires_grad_(True)
        local_bias = bias[columns].clone().requires_grad_(True)
        if form == "dtensor":
            actual, stats = bs_linear_loss(
                local_hidden,
                ctx.weight_dtensor(local_weight, weight),
                labels,
                bias=ctx.weight_dtensor(local_bias, bias),
                return_stats=True,
                **options,
            )
        else:
            actual, stats = vocab_parallel_linear_loss(
                local_hidden, local_weight, labels, columns.start, local_bias=local_bias, return_stats=True, **options
            )
        grads = torch.autograd.grad((actual * upstream_weights(actual)).sum(), [local_hidden, local_weight, local_bias])
        ctx.close(actual, expected.detach(), f"{form} linear loss")
        ctx.close(grads[0], expected_grads[0], f"{form} grad hidden")
        ctx.close(grads[1], expected_grads[1][columns], f"{form} grad weight")
        ctx.close(grads[2], expected_grads[2][columns], f"{form} grad bias")
        ctx.close(stats.token_logprobs, expected_stats.token_logprobs, f"{form} linear token_logprobs")
        ids, probs = sorted_beliefs(stats)
        expected_ids, expected_probs = sorted_beliefs(expected_stats)
        assert torch.equal(ids, expected_ids), f"{form} linear belief ids differ"
        ctx.close(probs, expected_probs, f"{form} linear belief probs")


def case_bad_input(ctx: Context) -> None:
    """Errors that name the argument, raised on every rank alike."""
    from torch.distributed.tensor import DTensor, Replicate

    logits, labels = make_case(torch.float32)
    columns = ctx.even_range(VOCAB)
    local = logits[..., columns]
    checks = [
        (lambda: vocab_parallel_bs_token_loss(local, labels, 0), "vocab_start"),  # every shard claims id 0
        (lambda: vocab_parallel_bs_token_loss(local, labels, columns.start, impl="reference"), "reference"),
        (lambda: vocab_parallel_bs_token_loss(local, labels, -1), "vocab_start"),
        (lambda: bs_token_loss(DTensor.from_local(logits, ctx.mesh, [Replicate()]), labels), "Shard(2)"),
        (lambda: vocab_parallel_bs_token_loss(local, labels.clamp(max=VOCAB) * 0 + VOCAB, columns.start), "labels"),
    ]
    for call, needle in checks:
        try:
            call()
        except (ValueError, TypeError) as error:
            assert needle in str(error), f"error {error!r} does not mention {needle!r}"
        else:
            raise AssertionError(f"no error raised (expected one naming {needle!r})")


def raised(call) -> BaseException | None:
    """The exception ``call()`` raised (ValueError or TypeError), or None if it returned."""
    try:
        call()
    except (ValueError, TypeError) as error:
        return error
    return None


def assert_same_error_everywhere(ctx: Context, call, needle: str, what: str) -> None:
    """``call()`` raises a ValueError naming ``needle`` on every rank, with the same message, within seconds."""
    started = time.perf_counter()
    error = raised(call)
    seconds = time.perf_counter() - started
    messages = [None] * ctx.world
    dist.all_gather_object(messages, f"{type(error).__name__}: {error}")
    assert isinstance(error, ValueError), f"{what}: rank {ctx.rank} got {error!r}, expected a ValueError"
    assert needle in str(error), f"{what}: {error} does not name {needle!r}"
    assert len(set(messages)) == 1, f"{what}: the ranks raised different errors: {messages}"
    assert seconds < 20, f"{what}: took {seconds:.1f} s (a rank waited in a collective)"


def case_ranks_that_disagree(ctx: Context) -> None:
    """Ranks that disagree on top_k, the batch, the dtype, the labels' shape or values, shift or lam raise the same
    ValueError naming it on every rank, in every form (issue 26, item 8): no collective of mismatched size, no value
    read from an unfilled buffer."""
    from torch.distributed.tensor import DTensor, Shard

    impl = ctx.impls[0]
    odd = ctx.rank == ctx.world - 1  # the one rank that differs
    columns = ctx.even_range(VOCAB)

    def plain(logits, labels, **options):
        return lambda: vocab_parallel_bs_token_loss(logits[..., columns], labels, columns.start, impl=impl, **options)

    def dtensor(logits, labels, **options):
        sharded = DTensor.from_local(
            logits[..., columns], ctx.mesh, [Shard(-1)], run_check=False, shape=logits.shape, stride=logits.stride()
        )
        return lambda: bs_token_loss(sharded, labels, impl=impl, **options)

    logits, labels = make_case(torch.float32)
    other_labels = labels.clone()
    other_labels[2, 3] = (int(labels[2, 3]) + 1) % VOCAB
    first_column = labels.clone()  # a position shift=True drops, but the range check reads: V + 5 on one rank only
    first_column[0, 0] = VOCAB + 5
    short_logits, short_labels = make_case(torch.float32, batch=2)
    long_logits, long_labels = make_case(torch.float32, length=9)
    cases = [
        ("top_k", lambda form: form(logits, labels, top_k=3 if odd else 4)),
        ("labels shape", lambda form: form(*((short_logits, short_labels) if odd else (logits, labels)))),
        ("labels shape", lambda form: form(*((long_logits, long_labels) if odd else (logits, labels)))),
        ("dtype", lambda form: form(logits.double() if odd else logits, labels)),
        ("labels (a checksum", lambda form: form(logits, other_labels if odd else labels)),
        ("labels (a checksum", lambda form: form(logits, first_column if odd else labels)),
        ("lam", lambda form: form(logits, labels, lam=0.5 if odd else 0.2)),
        ("shift", lambda form: form(logits, labels, shift=not odd, reduction="token_mean")),
    ]
    for (needle, make), form in itertools.product(cases, (plain, dtensor)):
        assert_same_error_everywhere(ctx, make(form), needle, f"{needle} ({form.__name__} form)")
    hidden, weight, bias, labels = linear_case(torch.float32)
    assert_same_error_everywhere(
        ctx,
        lambda: vocab_parallel_linear_loss(hidden, weight[columns], labels, columns.start, impl=impl, top_k=2 + odd),
        "top_k",
        "top_k (fused form)",
    )
    assert_same_error_everywhere(
        ctx,
        lambda: bs_linear_loss(
            hidden.double() if odd else hidden,
            ctx.weight_dtensor(weight[columns].double() if odd else weight[columns], weight),
            labels,
            impl=impl,
        ),
        "dtype",
        "dtype (DTensor fused form)",
    )


def assert_the_failing_rank_is_quoted(ctx: Context, calls) -> None:
    """Per (needle, call): the last rank's call raises its own error naming ``needle``; every other rank raises the
    same ValueError quoting it (and naming that rank), within seconds rather than at the process group's timeout."""
    odd = ctx.rank == ctx.world - 1
    for needle, call in calls:
        started = time.perf_counter()
        error = raised(call)
        seconds = time.perf_counter() - started
        errors = [None] * ctx.world
        dist.all_gather_object(errors, repr(error))
        assert error is not None and needle in str(error), f"rank {ctx.rank}: {error!r} does not name {needle!r}"
        if not odd:
            assert isinstance(error, ValueError) and f"rank {ctx.world - 1} " in str(error), error
        assert len(set(errors[:-1])) == 1, f"the ranks that passed raised different errors: {errors}"
        assert seconds < 20, f"{needle}: took {seconds:.1f} s (a rank waited in a collective)"


def case_one_rank_rejects_its_arguments(ctx: Context) -> None:
    """A rank whose arguments fail a local check (a bad label, lam=2.0, a float label tensor, a bad vocab_start)
    raises its own error; every other rank raises a ValueError quoting it at once, instead of waiting in an
    all_gather until the process group's timeout (issue 26, item 10)."""
    from torch.distributed.tensor import DTensor, Shard

    impl = ctx.impls[0]
    odd = ctx.rank == ctx.world - 1
    columns = ctx.even_range(VOCAB)
    logits, labels = make_case(torch.float32)
    local = logits[..., columns]
    bad_labels = labels.clone()
    bad_labels[0, 4] = -5
    hidden, weight, bias, linear_labels = linear_case(torch.float32)
    sharded = DTensor.from_local(
        local, ctx.mesh, [Shard(-1)], run_check=False, shape=logits.shape, stride=logits.stride()
    )
    calls = [
        (
            "lam must be in [0, 1]",
            lambda: vocab_parallel_bs_token_loss(local, labels, columns.start, lam=2.0 if odd else 0.2, impl=impl),
        ),
        (
            "labels contains -5",
            lambda: vocab_parallel_bs_token_loss(local, bad_labels if odd else labels, columns.start, impl=impl),
        ),
        (
            "labels must be an integer tensor",
            lambda: bs_token_loss(sharded, labels.float() if odd else labels, impl=impl),
        ),
        (
            "vocab_start must be an int",
            lambda: vocab_parallel_forget_logprobs(local, labels, -1 if odd else columns.start, impl=impl),
        ),
        ("labels [B, T]", lambda: bs_token_loss(sharded, labels[:, :5] if odd else labels, impl=impl)),
        (
            "shift must be a bool",
            lambda: vocab_parallel_bs_token_loss(local, labels, columns.start, shift="yes" if odd else True),
        ),
        (
            "lam must be in [0, 1]",
            lambda: vocab_parallel_linear_loss(
                hidden, weight[columns], linear_labels, columns.start, lam=2.0 if odd else 0.2, impl=impl
            ),
        ),
        (  # a bias on another device failed in the first chunk's matmul, after the ranks had started gathering
            "bias must be [V_p]",
            lambda: vocab_parallel_linear_loss(
                hidden,
                weight[columns],
                linear_labels,
                columns.start,
                local_bias=bias[columns].to("meta" if odd else "cpu"),
                impl=impl,
            ),
        ),
    ]
    assert_the_failing_rank_is_quoted(ctx, calls)
    # A label >= V on one rank cannot be seen before V is known: the labels' checksum differs instead, and every
    # rank raises the same error.
    out_of_range = labels.clone()
    out_of_range[0, 4] = VOCAB + 3
    assert_same_error_everywhere(
        ctx,
        lambda: vocab_parallel_bs_token_loss(local, out_of_range if odd else labels, columns.start, impl=impl),
        "labels (a checksum",
        "a label >= V on one rank",
    )
    # The same bad label on every rank: the range check after the exchange, the same message everywhere.
    assert_same_error_everywhere(
        ctx,
        lambda: vocab_parallel_bs_token_loss(local, out_of_range, columns.start, impl=impl),
        f"labels contains {VOCAB + 3}",
        "a label >= V on every rank",
    )


def case_one_dtensor_rank_rejects_its_options(ctx: Context) -> None:
    """The DTensor entry (bs_token_loss, forget_logprobs, bs_linear_loss, linear_forget_logprobs given a sharded
    tensor): a rank whose options, flags, labels' type or sequence_mean rule fail the entry point's own checks still
    makes every rank raise at once (those checks run inside the agreed local check), instead of raising alone while
    the others wait in the call record's all_gather until the process group's timeout (issue 26, item 10)."""
    from torch.distributed.tensor import DTensor, Shard

    impl = ctx.impls[0]
    odd = ctx.rank == ctx.world - 1
    columns = ctx.even_range(VOCAB)
    logits, labels = make_case(torch.float32)
    sharded = DTensor.from_local(
        logits[..., columns], ctx.mesh, [Shard(-1)], run_check=False, shape=logits.shape, stride=logits.stride()
    )
    hidden, weight, _, linear_labels = linear_case(torch.float32)
    sharded_weight = ctx.weight_dtensor(weight[columns], weight)
    flat_hidden, flat_labels = hidden.flatten(0, 1), linear_labels.flatten()
    calls = [
        ("lam must be in [0, 1]", lambda: bs_token_loss(sharded, labels, lam=2.0 if odd else 0.2, impl=impl)),
        ("impl must be one of", lambda: bs_token_loss(sharded, labels, impl="fast" if odd else impl)),
        (
            "inplace_backward must be a bool",
            lambda: bs_token_loss(sharded, labels, inplace_backward=1 if odd else False, impl=impl),
        ),
        ("ignore_index must be an int", lambda: forget_logprobs(sharded, labels, ignore_index=0.5 if odd else -100)),
        (
            "lam must be in [0, 1]",
            lambda: bs_linear_loss(hidden, sharded_weight, linear_labels, lam=2.0 if odd else 0.2, impl=impl),
        ),
        (
            "accumulate_in_fp32 must be a bool",
            lambda: bs_linear_loss(
                hidden, sharded_weight, linear_labels, accumulate_in_fp32="no" if odd else True, impl=impl
            ),
        ),
        (
            "labels must be a torch.Tensor",
            lambda: bs_linear_loss(hidden, sharded_weight, linear_labels.tolist() if odd else linear_labels, impl=impl),
        ),
        (
            'reduction="sequence_mean" needs labels with a sequence dimension',
            lambda: bs_linear_loss(
                flat_hidden if odd else hidden,
                sharded_weight,
                flat_labels if odd else linear_labels,
                shift=False,
                impl=impl,
            ),
        ),
        (
            "shift must be a bool",
            lambda: linear_forget_logprobs(hidden, sharded_weight, linear_labels, shift="yes" if odd else True),
        ),
    ]
    assert_the_failing_rank_is_quoted(ctx, calls)


def case_empty_batch(ctx: Context) -> None:
    """An empty batch (B = 0) gives what one process gives: 0 with a zero gradient for every reduction, an empty
    tensor (and empty stats) for "none"; plain, DTensor and fused forms (issue 26, item 13)."""
    from torch.distributed.tensor import DTensor, Shard

    columns = ctx.even_range(VOCAB)
    for impl, dtype, reduction in itertools.product(ctx.impls, DTYPES, REDUCTIONS):
        logits = torch.randn(0, 5, VOCAB, dtype=dtype)
        labels = torch.zeros(0, 5, dtype=torch.int64)
        expected, expected_stats = bs_token_loss(
            logits.clone().requires_grad_(True), labels, impl=impl, top_k=3, reduction=reduction, return_stats=True
        )
        for form in ("plain", "dtensor"):
            local = logits[..., columns].clone().requires_grad_(True)
            if form == "dtensor":
                sharded = DTensor.from_local(
                    local, ctx.mesh, [Shard(-1)], run_check=False, shape=logits.shape, stride=logits.stride()
                )
                actual, stats = bs_token_loss(
                    sharded, labels, impl=impl, top_k=3, reduction=reduction, return_stats=True
                )
            else:
                actual, stats = vocab_parallel_bs_token_loss(
                    local, labels, columns.start, impl=impl, top_k=3, reduction=reduction, return_stats=True
                )
            assert actual.shape == expected.shape and actual.dtype == expected.dtype, (actual, expected)
            torch.testing.assert_close(actual.detach(), expected.detach(), rtol=0, atol=0)
            (grad,) = torch.autograd.grad(actual.sum(), local)
            assert grad.shape == local.shape, grad.shape
            for name in ("token_logprobs", "belief_ids", "belief_probs"):
                assert getattr(stats, name).shape == getattr(expected_stats, name).shape, name
        forget = vocab_parallel_forget_logprobs(logits[..., columns], labels, columns.start, impl=impl)
        assert forget.shape == (0, 4), forget.shape
        hidden, weight = torch.randn(0, 5, 8, dtype=dtype), torch.randn(VOCAB, 8, dtype=dtype)
        inputs = [hidden.clone().requires_grad_(True), weight[columns].clone().requires_grad_(True)]
        actual = vocab_parallel_linear_loss(*inputs, labels, columns.start, impl=impl, top_k=3, reduction=reduction)
        expected = bs_linear_loss(hidden, weight, labels, impl=impl, top_k=3, reduction=reduction)
        assert actual.shape == expected.shape, (actual, expected)
        torch.testing.assert_close(actual.detach(), expected, rtol=0, atol=0)
        grads = torch.autograd.grad(actual.sum(), inputs)
        assert not bool(grads[1].any()), "an empty batch gave a non-zero weight gradient"


def tiny_llama(dtype=torch.float64):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=37,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config).to(dtype)


def case_tiny_llama_training_step(ctx: Context) -> None:
    """A Llama whose lm_head is ColwiseParallel(use_local_output=False) over the group: one SGD step with the fused
    loss (patch_causal_lm) and one with the loss on its DTensor logits equal the unsharded model's steps."""
    if ctx.world != 2:
        return
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    generator = torch.Generator().manual_seed(8)
    input_ids = torch.randint(0, 37, (2, 9), generator=generator)
    labels = input_ids.clone()
    labels[:, :3] = -100
    options = dict(lam=0.5, top_k=5, detach_belief=False)
    for fused in (True, False):  # the backends are covered above; this is about the model and DTensor plumbing
        impl = ctx.impls[0]
        models = []
        for parallel in (False, True):
            model = tiny_llama()
            if parallel:
                parallelize_module(model, ctx.mesh, {"lm_head": ColwiseParallel(use_local_output=False)})
            optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
            if fused:
                with bs_kernels.patch_causal_lm(model):
                    loss = model(input_ids, labels=labels, bs_loss=dict(impl=impl, **options)).loss
            else:
                logits = model(input_ids).logits
                assert isinstance(logits, DTensor) == parallel, "ColwiseParallel should give DTensor logits"
                loss = bs_token_loss(logits, labels, impl=impl, **options)
            loss.backward()
            optimizer.step()
            models.append((loss.detach(), model))
        (expected_loss, expected), (actual_loss, actual) = models
        ctx.close(actual_loss, expected_loss, f"fused={fused} loss")
        for (name, p_expected), (_, p_actual) in zip(expected.named_parameters(), actual.named_parameters()):
            value = p_actual.full_tensor() if isinstance(p_actual, DTensor) else p_actual
            ctx.close(value.detach(), p_expected.detach(), f"fused={fused} parameter {name} after one step")


CASES = {
    name.removeprefix("case_"): function
    for name, function in sorted(globals().items())
    if name.startswith("case_") and callable(function)
}


def run(
    rank: int, world: int, rendezvous: str, impls: list[str], tolerances: dict, output_dir: str, cases: list[str]
) -> None:
    """Process ``rank`` of ``world``: the named cases of CASES; writes {case: null | traceback, "seconds": {...}}."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    # A bounded timeout: a case that fails on one rank mid-collective ends the run with an error, not a hang.
    dist.init_process_group(
        "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
    )
    results, seconds = {}, {}
    try:
        ctx = Context(rank, world, impls, tolerances)
        for name in cases:
            case = CASES[name]
            started = time.perf_counter()
            try:
                case(ctx)
                results[name] = None
            except Exception:  # recorded for the test to report; the other cases still run
                results[name] = traceback.format_exc()
            seconds[name] = round(time.perf_counter() - started, 3)
            dist.barrier()  # a failed case must not leave a collective half-done for the next one
    finally:
        with open(os.path.join(output_dir, f"rank{rank}.json"), "w") as handle:
            json.dump({"results": results, "seconds": seconds}, handle)
        dist.destroy_process_group()
