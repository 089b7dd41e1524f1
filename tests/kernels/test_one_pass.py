"""The one-pass gradient of impl="native" (bs_kernels/one_pass.py): a scalar loss whose gradient is formed in forward.

Against the float64 reference (the shared tolerance table) and against the two-pass path, on the cases where the
sparse rewrite could go wrong: the label among the beliefs or not, k >= V, ties, ignored rows holding NaN/inf,
counted rows without a distribution, an incoming gradient other than 1, a second backward, create_graph.
"""

from __future__ import annotations

import pytest
import torch
from cases import leaf, random_case
from conftest import TOLERANCES

from bs_kernels import bs_token_loss, one_pass
from bs_kernels.backends import native

NATIVE_REASON = native.unavailable_reason(torch.device("cpu"))
pytestmark = pytest.mark.skipif(NATIVE_REASON is not None, reason=str(NATIVE_REASON))

SCALAR_REDUCTIONS = ("sequence_mean", "token_mean", "sum")


@pytest.fixture
def forward_grads(monkeypatch):
    """The gradients native.forward_grad returned, in call order (the one-pass path ran iff this is non-empty)."""
    grads = []
    original = native.forward_grad

    def spy(*args, **kwargs):
        raw, grad = original(*args, **kwargs)
        grads.append(grad)
        return raw, grad

    monkeypatch.setattr(native, "forward_grad", spy)
    return grads


def _grad(logits, labels, impl, scale=1.0, **options):
    source = leaf(logits)
    loss = bs_token_loss(source, labels, impl=impl, **options)
    (loss * scale).backward()
    return loss.detach(), source.grad


def _assert_close(actual, expected, dtype):
    torch.testing.assert_close(actual.double(), expected.double(), equal_nan=True, **TOLERANCES[dtype])


def _hard_case(vocab=13):
    """[2, 6, V] float64, shift=True: a -inf label logit, a NaN and a +inf on counted rows (no distribution), a row
    of -inf, masked vocabulary, ties, ignored rows holding NaN and +inf; the label among the top k on some rows."""
    logits, labels = random_case(2, 6, vocab, ignored_prefix=0)
    labels[0, 2] = -100
    label_of = lambda b, t: int(labels[b, t + 1])  # noqa: E731
    logits[0, 0, label_of(0, 0)] = float("-inf")
    logits[0, 1, 4] = float("nan")  # predicts the ignored label
    logits[0, 1, 7] = float("inf")
    logits[0, 3, 5] = float("inf")  # counted: no distribution
    logits[0, 4] = float("-inf")  # counted: no finite logit
    logits[1, 0, 3:] = float("-inf")
    logits[1, 0, label_of(1, 0)] = 0.5
    logits[1, 1, :] = 1.25  # all tied
    logits[1, 2, label_of(1, 2)] = 9.0  # the label is the top belief
    logits[1, 3, :6] = 2.0  # ties at the top
    return logits, labels


TIED = ((1, 1), (1, 3))  # rows whose top k is any k of the tied ids: compared with the two-pass path only


def _untied(values: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(values.shape[:2], dtype=torch.bool)
    for b, t in TIED:
        keep[b, t] = False
    return values[keep]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
@pytest.mark.parametrize(("lam", "detach_belief"), [(0.2, True), (0.3, False), (1.0, False), (0.0, True)])
@pytest.mark.parametrize("reduction", SCALAR_REDUCTIONS)
def test_matches_reference_and_two_pass(forward_grads, monkeypatch, reduction, lam, detach_belief, dtype):
    logits, labels = _hard_case()
    options = dict(lam=lam, top_k=5, detach_belief=detach_belief, reduction=reduction)
    ref_loss, ref_grad = _grad(logits, labels, "reference", scale=2.5, **options)
    loss, grad = _grad(logits.to(dtype), labels, "native", scale=2.5, **options)
    assert len(forward_grads) == 1, "the one-pass path did not run"
    monkeypatch.setenv(one_pass.TWO_PASS_ENV, "1")
    two_loss, two_grad = _grad(logits.to(dtype), labels, "native", scale=2.5, **options)
    assert len(forward_grads) == 1, "the switch did not select the two-pass path"
    assert grad.dtype == dtype
    assert torch.equal(loss, two_loss) or (loss.isnan() and two_loss.isnan())
    if dtype == torch.bfloat16:  # scaling the stored bf16 gradient by 2.5 rounds once more: 2 half-ulps at most
        torch.testing.assert_close(grad, two_grad, equal_nan=True, atol=0, rtol=2**-7)
    else:
        _assert_close(grad, two_grad, dtype)
        _assert_close(_untied(grad), _untied(ref_grad), dtype)
        _assert_close(loss, ref_loss, dtype)  # NaN: counted rows without a distribution
    # The documented rules: NaN rows where a counted row has no distribution, zeros on ignored rows.
    assert grad[0, 3].isnan().all() and grad[0, 4].isnan().all()
    assert (grad[0, 1] == 0).all() and (grad[:, 5] == 0).all()


@pytest.mark.parametrize("top_k", [1, 13, 40])
def test_gradient_of_one_is_two_pass_bit_for_bit(forward_grads, monkeypatch, top_k):
    """With an incoming gradient of exactly 1 the stored gradient is the two-pass one, element for element."""
    logits, labels = random_case(3, 9, 13 if top_k != 1 else 301, dtype=torch.float32)
    _, grad = _grad(logits, labels, "native", top_k=top_k)
    assert len(forward_grads) == 1
    monkeypatch.setenv(one_pass.TWO_PASS_ENV, "1")
    _, expected = _grad(logits, labels, "native", top_k=top_k)
    assert torch.equal(grad, expected)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_backward_hands_over_the_forward_gradient(forward_grads, scale):
    """The gradient buffer of forward becomes logits.grad: backward allocates no second [N, V] buffer."""
    logits, labels = random_case(2, 5, 97, dtype=torch.float32)
    source = leaf(logits)
    (bs_token_loss(source, labels, impl="native") * scale).backward()
    (stored,) = forward_grads
    assert source.grad.data_ptr() == stored.data_ptr()


def test_second_backward_is_independent_and_correct(forward_grads):
    logits, labels = random_case(2, 6, 31)
    source = leaf(logits)
    loss = bs_token_loss(source, labels, impl="native")
    (first,) = torch.autograd.grad(loss, source, retain_graph=True)
    kept = first.clone()
    (second,) = torch.autograd.grad(loss * 3.0, source, retain_graph=True)
    assert second.data_ptr() != first.data_ptr()
    torch.testing.assert_close(first, kept, rtol=0, atol=0)  # the second backward did not touch the first's result
    torch.testing.assert_close(second, 3.0 * kept, **TOLERANCES[torch.float64])
    _, expected = _grad(logits, labels, "reference")
    torch.testing.assert_close(first, expected, **TOLERANCES[torch.float64])
    loss.backward(retain_graph=True)
    loss.backward()
    torch.testing.assert_close(source.grad, 2 * expected, **TOLERANCES[torch.float64])
    assert len(forward_grads) == 1


def test_create_graph_raises_as_the_two_pass_path(forward_grads):
    logits, labels = random_case(2, 5, 31)
    source = leaf(logits)
    loss = bs_token_loss(source, labels, impl="native")
    assert len(forward_grads) == 1
    with pytest.raises(RuntimeError, match="second derivatives .* not supported by the kernel impls"):
        torch.autograd.grad(loss, source, create_graph=True)
    # The refused backward handed nothing over: a first-order backward of the same graph still gets the gradient.
    (grad,) = torch.autograd.grad(loss, source)
    assert grad.data_ptr() == forward_grads[0].data_ptr()


@pytest.mark.parametrize(
    "case", ["reduction_none", "inplace_backward", "no_grad", "frozen_logits", "impl_torch"]
)  # fmt: skip
def test_two_pass_where_one_pass_does_not_apply(forward_grads, case):
    logits, labels = random_case(2, 5, 31)
    source = leaf(logits) if case != "frozen_logits" else logits
    options = dict(impl="torch" if case == "impl_torch" else "native")
    if case == "reduction_none":
        options["reduction"] = "none"
    if case == "inplace_backward":
        options["inplace_backward"] = True
    with torch.set_grad_enabled(case != "no_grad"):
        bs_token_loss(source * 1.0 if case == "inplace_backward" else source, labels, **options)
    assert forward_grads == []


def test_stats_match_the_two_pass_path(forward_grads, monkeypatch):
    logits, labels = random_case(2, 7, 41, dtype=torch.float32)
    loss, stats = bs_token_loss(leaf(logits), labels, impl="native", return_stats=True)
    assert len(forward_grads) == 1
    monkeypatch.setenv(one_pass.TWO_PASS_ENV, "1")
    two_loss, two_stats = bs_token_loss(leaf(logits), labels, impl="native", return_stats=True)
    assert torch.equal(loss, two_loss)
    for actual, expected in zip(stats, two_stats, strict=True):
        assert torch.equal(actual, expected)
    assert not stats.token_logprobs.requires_grad


@pytest.mark.parametrize("inplace", [False, True], ids=["out_of_place", "inplace"])
def test_forward_grad_operators(inplace):
    """opcheck (schema, fake implementation, aliasing) of native_forward_grad and its in-place variant."""
    logits, labels = random_case(1, 6, 23, dtype=torch.float32)
    rows, row_labels = logits.reshape(-1, 23), labels.reshape(-1).clamp(min=-1)
    arguments = (rows.clone(), row_labels, 4, torch.rand(6))
    operator = torch.ops.bs_kernels.native_forward_grad_ if inplace else torch.ops.bs_kernels.native_forward_grad
    torch.library.opcheck(operator.default, arguments)


def test_sparse_grad_operator():
    """opcheck of native_sparse_grad_, on the statistics of a forward."""
    logits, labels = random_case(1, 6, 23, dtype=torch.float32)
    rows, row_labels = logits.reshape(-1, 23), labels.reshape(-1).clamp(min=-1)
    row_max, log_sum, label_logits, belief_logits, belief_ids = torch.ops.bs_kernels.native_forward(rows, row_labels, 4)
    arguments = (rows.clone(), torch.rand(6), row_labels, row_max, log_sum, label_logits, belief_logits, belief_ids,
                 torch.rand(6, 4), 0.8)  # fmt: skip
    torch.library.opcheck(torch.ops.bs_kernels.native_sparse_grad_.default, arguments)


def test_fused_linear_takes_the_one_pass(forward_grads, monkeypatch):
    """bs_linear_loss(impl="native") writes each chunk's gradient in the chunk's forward pass, with the gradients of
    the two-pass chunk path bit for bit (same kernel code, same row weights)."""
    from bs_kernels import bs_linear_loss

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 9, 16, generator=generator)
    weight = torch.randn(301, 16, generator=generator)
    labels = torch.randint(0, 301, (2, 9), generator=generator)
    labels[:, :2] = -100

    def grads():
        h, w = leaf(hidden), leaf(weight)
        loss = bs_linear_loss(h, w, labels, impl="native", top_k=7)
        loss.backward()
        return loss.detach(), h.grad, w.grad

    one = grads()
    assert len(forward_grads) >= 1
    monkeypatch.setenv(one_pass.TWO_PASS_ENV, "1")
    calls = len(forward_grads)
    two = grads()
    assert len(forward_grads) == calls
    for actual, expected in zip(one, two, strict=True):
        assert torch.equal(actual, expected)


def test_auto_on_cpu_takes_the_one_pass(forward_grads):
    logits, labels = random_case(2, 5, 31)
    _, grad = _grad(logits, labels, "auto")
    assert len(forward_grads) == 1
    _, expected = _grad(logits, labels, "reference")
    torch.testing.assert_close(grad, expected, **TOLERANCES[torch.float64])
