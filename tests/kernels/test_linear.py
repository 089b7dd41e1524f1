"""bs_linear_loss / linear_forget_logprobs against bs_token_loss on explicitly formed logits (float64 reference).

Every kernel impl (the `impl` fixture) runs the same cases; CHUNK_ELEMENTS is shrunk so that every case spans
several row chunks (the accumulation across chunks is what can go wrong).
"""

from __future__ import annotations

import pytest
import torch
from cases import leaf
from conftest import TOLERANCES

from bs_kernels import _chunks as chunks_module
from bs_kernels import bs_token_loss, forget_logprobs
from bs_kernels.linear import bs_linear_loss, linear_forget_logprobs

SHIPPED_CHUNK_ELEMENTS = chunks_module.CHUNK_ELEMENTS  # read before the autouse fixture below shrinks it

REDUCTIONS = ("sequence_mean", "token_mean", "sum", "none")


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of 4 rows at V = 37 (so 3-5 chunks per case): exercises the cross-chunk accumulation."""
    monkeypatch.setattr(chunks_module, "CHUNK_ELEMENTS", 4 * 37)


def make_case(batch=2, length=9, hidden_size=19, vocab=37, *, bias=True, seed=0, ignored_prefix=2):
    """hidden [B, T, H], weight [V, H], bias [V] in float64 (logits of order 3, tie-free) and labels [B, T]."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, hidden_size, generator=generator, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_size, generator=generator, dtype=torch.float64) * (3.0 / hidden_size**0.5)
    bias_values = torch.randn(vocab, generator=generator, dtype=torch.float64) if bias else None
    labels = torch.randint(0, vocab, (batch, length), generator=generator)
    labels[:, :ignored_prefix] = -100
    return hidden, weight, bias_values, labels


def grads_of(loss, inputs):
    """Gradient of sum(loss * w), w = linspace(1, 2) (w = 1 for a scalar), for the inputs that require grad."""
    weights = torch.linspace(1.0, 2.0, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    wanted = [x for x in inputs if x is not None and x.requires_grad]
    return torch.autograd.grad((loss * weights).sum(), wanted)


def run_linear(hidden, weight, bias, labels, impl, **options):
    h, w = leaf(hidden), leaf(weight)
    b = None if bias is None else leaf(bias)
    loss, stats = bs_linear_loss(h, w, labels, bias=b, impl=impl, return_stats=True, **options)
    return loss.detach(), stats, grads_of(loss, (h, w, b))


def run_explicit(hidden, weight, bias, labels, impl="reference", **options):
    """The spec: logits formed explicitly (as nn.Linear, i.e. an lm_head, forms them), then bs_token_loss."""
    h, w = leaf(hidden), leaf(weight)
    b = None if bias is None else leaf(bias)
    logits = torch.nn.functional.linear(h, w, b)
    loss, stats = bs_token_loss(logits, labels, impl=impl, return_stats=True, **options)
    return loss.detach(), stats, grads_of(loss, (h, w, b))


def assert_close(actual, expected, dtype):
    torch.testing.assert_close(actual.to(torch.float64), expected.to(torch.float64), **TOLERANCES[dtype])


def assert_same_stats(stats, expected, labels):
    valid = labels[:, 1:] != -100
    torch.testing.assert_close(stats.token_logprobs.double(), expected.token_logprobs.double(), atol=1e-5, rtol=1e-5)
    assert (stats.token_logprobs[~valid] == 0).all()
    ids, expected_ids = stats.belief_ids[valid].sort(-1), expected.belief_ids[valid].sort(-1)
    torch.testing.assert_close(ids.values, expected_ids.values)
    probs = stats.belief_probs[valid].gather(-1, ids.indices).double()
    expected_probs = expected.belief_probs[valid].gather(-1, expected_ids.indices).double()
    torch.testing.assert_close(probs, expected_probs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("detach_belief", [True, False], ids=["detached", "attached"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_explicit_logits(impl, reduction, detach_belief, dtype):
    hidden, weight, bias, labels = make_case()
    labels[1, 5] = -100  # an ignored position in the middle of a sequence
    options = dict(lam=0.3, top_k=5, detach_belief=detach_belief, reduction=reduction)
    loss, stats, grads = run_linear(hidden.to(dtype), weight.to(dtype), bias.to(dtype), labels, impl, **options)
    ref_loss, ref_stats, ref_grads = run_explicit(hidden, weight, bias, labels, **options)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert loss.shape == ref_loss.shape
    assert_close(loss, ref_loss, dtype)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert grad.dtype == dtype
        assert_close(grad, ref_grad, dtype)
    assert_same_stats(stats, ref_stats, labels)


@pytest.mark.parametrize(
    "shape",
    [(1, 2, 5, 37), (3, 4, 1, 37), (2, 5, 7, 13), (1, 4, 6, 70_001)],
    ids=["one_row", "H_is_1", "k_at_least_V", "V_over_65536"],
)
def test_odd_shapes(impl, shape):
    batch, length, hidden_size, vocab = shape
    hidden, weight, bias, labels = make_case(batch, length, hidden_size, vocab, ignored_prefix=1)
    options = dict(top_k=20 if vocab == 13 else 5, reduction="token_mean")
    loss, _, grads = run_linear(hidden.float(), weight.float(), bias.float(), labels, impl, **options)
    ref_loss, _, ref_grads = run_explicit(hidden, weight, bias, labels, **options)
    assert_close(loss, ref_loss, torch.float32)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert_close(grad, ref_grad, torch.float32)


def eager_same_dtype(hidden, weight, bias, labels, impl, **options):
    """What users had before, in the low precision dtype: logits = h @ W.T + b in that dtype, then bs_token_loss."""
    return run_explicit(hidden, weight, bias, labels, impl=impl, **options)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("reduction", ["sequence_mean", "none"])
def test_error_budget_low_precision(impl, dtype, reduction):
    """Error against float64 no larger than the eager same-dtype path's (materialised logits), plus a little."""
    hidden, weight, bias, labels = make_case(2, 9, 32, 37)
    low = [x.to(dtype) for x in (hidden, weight, bias)]
    exact = [x.to(torch.float64) for x in low]  # the reference sees exactly the rounded inputs
    options = dict(top_k=5, reduction=reduction)
    loss, _, grads = run_linear(*low, labels, impl, **options)
    ref_loss, _, ref_grads = run_explicit(*exact, labels, **options)
    eager_loss, _, eager_grads = eager_same_dtype(*low, labels, impl, **options)
    atol = TOLERANCES[dtype]["atol"]
    assert (loss.double() - ref_loss).abs().max() <= (eager_loss.double() - ref_loss).abs().max() + atol
    for name, grad, ref_grad, eager_grad in zip(("hidden", "weight", "bias"), grads, ref_grads, eager_grads):
        assert grad.dtype == dtype, name
        error = (grad.double() - ref_grad).abs().max()
        eager_error = (eager_grad.double() - ref_grad).abs().max()
        assert error <= eager_error + atol, (name, float(error), float(eager_error))


def test_weight_grad_in_weight_dtype(impl):
    """accumulate_in_fp32=False: grad_W summed in bf16, one rounding per chunk (bounded by the chunk count)."""
    hidden, weight, bias, labels = make_case(2, 9, 32, 37)
    low = [x.to(torch.bfloat16) for x in (hidden, weight, bias)]
    exact = [leaf(x.double()) for x in low]
    _, _, grads = run_linear(*low, labels, impl, top_k=5, accumulate_in_fp32=False)
    _, _, fp32_grads = run_linear(*low, labels, impl, top_k=5)
    # |grad_W| partial sums are bounded by |dL/dz|^T |h|; each of the chunks rounds the running sum once (2^-8).
    logits = torch.nn.functional.linear(exact[0], exact[1], exact[2])
    (grad_logits,) = torch.autograd.grad(bs_token_loss(logits, labels, top_k=5, impl="reference"), logits)
    magnitude = grad_logits.abs().flatten(0, 1).t() @ exact[0].detach().abs().flatten(0, 1)
    num_chunks = -(-int((labels[:, 1:] != -100).sum()) // chunks_module.rows_per_chunk(10**6, 37))
    assert grads[1].dtype == torch.bfloat16
    assert ((grads[1].double() - fp32_grads[1].double()).abs() <= num_chunks * 2**-8 * magnitude + 1e-6).all()
    torch.testing.assert_close(grads[0], fp32_grads[0], atol=0, rtol=0)  # grad_h does not accumulate over chunks


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fully_ignored_sequences(impl, reduction):
    hidden, weight, bias, labels = make_case(3, 6, 11, 37)
    labels[1] = -100  # one sequence with nothing to learn
    options = dict(reduction=reduction, top_k=4)
    loss, _, grads = run_linear(hidden.float(), weight.float(), bias.float(), labels, impl, **options)
    ref_loss, _, ref_grads = run_explicit(hidden, weight, bias, labels, **options)
    assert_close(loss, ref_loss, torch.float32)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert_close(grad, ref_grad, torch.float32)
    assert (grads[0][1] == 0).all()

    labels[:] = -100  # nothing at all: 0 with zero gradients (docs/math.md)
    loss, _, grads = run_linear(hidden.float(), weight.float(), bias.float(), labels, impl, **options)
    assert (loss == 0).all()
    assert all((grad == 0).all() for grad in grads)


def test_tied_embedding_weight(impl):
    """weight shared with the input embedding: autograd sums both uses into the one parameter."""
    torch.manual_seed(0)
    vocab, hidden_size = 37, 12
    embedding = torch.nn.Embedding(vocab, hidden_size).double()
    mixer = torch.nn.Linear(hidden_size, hidden_size).double()
    ids = torch.randint(0, vocab, (2, 7))
    labels = ids.clone()
    labels[:, 0] = -100

    def loss_and_grad(use_linear: bool):
        embedding.zero_grad()
        hidden = torch.tanh(mixer(embedding(ids)))
        if use_linear:
            loss = bs_linear_loss(hidden, embedding.weight, labels, impl=impl)
        else:
            loss = bs_token_loss(hidden @ embedding.weight.t(), labels, impl="reference")
        loss.backward()
        return loss.detach(), embedding.weight.grad.clone()

    loss, grad = loss_and_grad(True)
    ref_loss, ref_grad = loss_and_grad(False)
    assert_close(loss, ref_loss, torch.float64)
    assert_close(grad, ref_grad, torch.float64)


@pytest.mark.parametrize("reduction", ["token_mean", "none"])
def test_frozen_weight_and_bias(impl, reduction):
    """A weight that does not require grad (frozen lm_head under LoRA): only hidden gets a gradient."""
    hidden, weight, bias, labels = make_case()
    h = leaf(hidden)
    loss = bs_linear_loss(h, weight, labels, bias=bias, impl=impl, reduction=reduction)
    (grad,) = grads_of(loss, (h,))
    ref_loss, _, ref_grads = run_explicit(hidden, weight, bias, labels, reduction=reduction)
    assert_close(loss.detach(), ref_loss, torch.float64)
    assert_close(grad, ref_grads[0], torch.float64)


def test_non_contiguous_hidden(impl):
    hidden, weight, bias, labels = make_case(2, 9, 19, 37)
    wide = torch.randn(9, 2, 40, dtype=torch.float64)
    wide[..., 3:22] = hidden.transpose(0, 1)
    view = leaf(wide)[..., 3:22].transpose(0, 1)  # [B, T, H], neither transposition nor slice is contiguous
    assert not view.is_contiguous()
    loss = bs_linear_loss(view, weight, labels, bias=bias, impl=impl)
    (grad,) = torch.autograd.grad(loss, view)
    ref_loss, _, ref_grads = run_explicit(hidden, weight, bias, labels)
    assert_close(loss.detach(), ref_loss, torch.float64)
    assert_close(grad, ref_grads[0], torch.float64)


def test_scaled_loss_and_no_grad(impl):
    """The fused path forms gradients in forward: backward must scale them by the incoming gradient."""
    hidden, weight, bias, labels = make_case()
    h, w = leaf(hidden), leaf(weight)
    loss = bs_linear_loss(h, w, labels, impl=impl)
    grad_h, grad_w = torch.autograd.grad(-3.5 * loss, (h, w))
    _, _, (ref_h, ref_w, _) = run_explicit(hidden, weight, bias * 0, labels)
    assert_close(grad_h, -3.5 * ref_h, torch.float64)
    assert_close(grad_w, -3.5 * ref_w, torch.float64)
    with torch.no_grad():
        value = bs_linear_loss(h, w, labels, impl=impl)
    assert not value.requires_grad
    assert_close(value, loss.detach(), torch.float64)


@pytest.mark.parametrize("reduction", ["token_mean", "none"])
def test_autocast(impl, reduction):
    """Under torch.autocast the lm_head runs in bf16: same as F.linear under autocast followed by bs_token_loss."""
    hidden, weight, bias, labels = (x.float() if x.is_floating_point() else x for x in make_case(2, 9, 32, 37))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _, grads = run_linear(hidden, weight, bias, labels, impl, reduction=reduction)
        eager_loss, _, eager_grads = run_explicit(hidden, weight, bias, labels, impl=impl, reduction=reduction)
    ref_loss, _, ref_grads = run_explicit(
        *(x.bfloat16().double() for x in (hidden, weight, bias)), labels, reduction=reduction
    )
    assert all(grad.dtype == torch.float32 for grad in grads)  # the leaves' dtype, as autocast gives them
    atol = TOLERANCES[torch.bfloat16]["atol"]
    assert (loss.double() - ref_loss).abs().max() <= (eager_loss.double() - ref_loss).abs().max() + atol
    for grad, ref_grad, eager_grad in zip(grads, ref_grads, eager_grads, strict=True):
        assert (grad.double() - ref_grad).abs().max() <= (eager_grad.double() - ref_grad).abs().max() + atol


def test_flat_rows_without_shift(impl):
    hidden, weight, bias, labels = make_case()
    rows, row_labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    options = dict(shift=False, reduction="sum")
    loss, _, grads = run_linear(rows, weight, bias, row_labels, impl, **options)
    h, w, b = leaf(rows), leaf(weight), leaf(bias)
    ref = bs_token_loss(h @ w.t() + b, row_labels, impl="reference", **options)
    assert_close(loss, ref.detach(), torch.float64)
    for grad, ref_grad in zip(grads, torch.autograd.grad(ref, (h, w, b)), strict=True):
        assert_close(grad, ref_grad, torch.float64)


def test_linear_forget_logprobs(impl):
    hidden, weight, bias, labels = make_case()
    h, w, b = leaf(hidden), leaf(weight), leaf(bias)
    values = linear_forget_logprobs(h.float(), w.float(), labels, bias=b.float(), impl=impl)
    assert values.shape == (2, 8) and values.dtype == torch.float32
    grads = grads_of(values, (h, w, b))
    h2, w2, b2 = leaf(hidden), leaf(weight), leaf(bias)
    ref = forget_logprobs(h2 @ w2.t() + b2, labels, impl="reference")
    ref_grads = grads_of(ref, (h2, w2, b2))
    assert_close(values.detach(), ref.detach(), torch.float32)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert_close(grad, ref_grad, torch.float32)


def test_reference_impl_is_the_explicit_path():
    hidden, weight, bias, labels = make_case()
    loss, _, grads = run_linear(hidden, weight, bias, labels, "reference", reduction="none")
    ref_loss, _, ref_grads = run_explicit(hidden, weight, bias, labels, reduction="none")
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref_grad, rtol=0, atol=0)


def test_chunk_bound():
    """The [C, V] logits block never exceeds CHUNK_ELEMENTS (one row at least)."""
    for rows, vocab in [(4096, 49_152), (8192, 128_256), (3, 70_001), (10, 10**9)]:
        chunk = chunks_module.rows_per_chunk(rows, vocab)
        assert 1 <= chunk <= rows
        assert chunk == 1 or chunk * vocab <= chunks_module.CHUNK_ELEMENTS


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda h, w, b, y: (h[..., :-1], w, b, y), ValueError, "hidden's last dimension"),
        (lambda h, w, b, y: (h, w.float(), b, y), TypeError, "same dtype"),
        (lambda h, w, b, y: (h, w, b[:-1], y), ValueError, "bias must be"),
        (lambda h, w, b, y: (h, w[0], b, y), ValueError, "weight must be"),
        (lambda h, w, b, y: (h, w, b, y[:, :-1]), ValueError, "hidden must be"),
        (lambda h, w, b, y: (h, w, b, y.float()), TypeError, "labels must be an integer"),
        (lambda h, w, b, y: (h, w, b, y + 37), ValueError, "outside"),
        (lambda h, w, b, y: (h.long(), w, b, y), TypeError, "hidden must be a floating"),
    ],
    ids=[
        "H_mismatch",
        "dtype_mismatch",
        "bias_shape",
        "weight_1d",
        "labels_shape",
        "float_labels",
        "label_range",
        "int_hidden",
    ],
)
def test_bad_input(mutate, error, match):
    hidden, weight, bias, labels = make_case()
    hidden, weight, bias, labels = mutate(hidden, weight, bias, labels)
    with pytest.raises(error, match=match):
        bs_linear_loss(hidden, weight, labels, bias=bias, impl="torch")


@pytest.mark.parametrize(
    "option, error",
    [
        ({"lam": 1.5}, ValueError),
        ({"top_k": 0}, ValueError),
        ({"reduction": "mean"}, ValueError),
        ({"impl": "cuda"}, ValueError),
        ({"ignore_index": 1.0}, TypeError),
    ],
)
def test_bad_options(option, error):
    hidden, weight, bias, labels = make_case()
    name = next(iter(option))
    with pytest.raises(error, match=name):
        bs_linear_loss(hidden, weight, labels, bias=bias, **option)


@pytest.mark.parametrize(
    "vocab_size, cuda, fp32_accumulator, expected",
    [
        (128_256, False, False, 261),  # CPU: as many rows as CHUNK_ELEMENTS holds
        (128_256, True, False, 256),  # CUDA: rounded down to whole 128-row GEMM tiles
        (128_256, True, True, 1024),  # 4x the elements where the fp32 grad_W accumulator is read and written per chunk
        (128_256, False, True, 261),  # the accumulator rule is CUDA-only
        (49_152, True, False, 640),  # 682 rows fit -> 640
        (1 << 20, True, False, 32),  # fewer rows than one tile fit: no rounding (never 0 rows)
    ],
)
def test_rows_per_chunk(vocab_size, cuda, fp32_accumulator, expected, monkeypatch):
    monkeypatch.setattr(chunks_module, "CHUNK_ELEMENTS", SHIPPED_CHUNK_ELEMENTS)  # not this module's tiny one
    rows = chunks_module.rows_per_chunk(100_000, vocab_size, cuda=cuda, fp32_accumulator=fp32_accumulator)
    assert rows == expected
    assert chunks_module.rows_per_chunk(7, vocab_size, cuda=cuda, fp32_accumulator=fp32_accumulator) == 7
