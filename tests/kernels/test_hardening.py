"""Regression tests of issue 15: in-place backward beside other saved tensors, non-finite logits (README "Non-finite
logits"), ignored positions holding NaN/inf, the torch backend at large logits, 1-D logits, meta tensors.

Each impl runs the same cases (the ``impl`` axis of conftest.py) against impl="reference" in float64.
"""

from __future__ import annotations

import pytest
import torch
from cases import leaf, random_case
from conftest import TOLERANCES

from bs_kernels import bs_token_loss, forget_logprobs, vocab_parallel_bs_token_loss

FLOAT64 = TOLERANCES[torch.float64]
INPLACE_ERROR = "modified by an inplace operation"


def _z_loss(h: torch.Tensor) -> torch.Tensor:
    """A second term that saves the same logits for its backward (PaLM's z-loss)."""
    return torch.logsumexp(h, dim=-1).pow(2).mean()


def _logits_grad(impl: str, logits: torch.Tensor, labels: torch.Tensor, *, inplace: bool, z_loss_first: bool):
    source = leaf(logits)
    h = source * 1.0  # a non-leaf, as a model's logits are
    if z_loss_first:  # created first, so its backward runs after the BS-T node's in-place one
        loss = _z_loss(h) + bs_token_loss(h, labels, impl=impl, inplace_backward=inplace)
    else:
        loss = bs_token_loss(h, labels, impl=impl, inplace_backward=inplace) + _z_loss(h)
    loss.backward()
    return source.grad


@pytest.mark.parametrize("z_loss_first", [False, True], ids=["bs_backward_last", "bs_backward_first"])
def test_inplace_backward_beside_another_saved_use(impl, z_loss_first):
    """Correct where the other node's backward runs first; autograd's inplace error (not a wrong gradient) where
    it would read the overwritten logits."""
    logits, labels = random_case(2, 6, 31)
    expected = _logits_grad(impl, logits, labels, inplace=False, z_loss_first=z_loss_first)
    if z_loss_first:
        with pytest.raises(RuntimeError, match=INPLACE_ERROR):
            _logits_grad(impl, logits, labels, inplace=True, z_loss_first=True)
    else:
        torch.testing.assert_close(
            _logits_grad(impl, logits, labels, inplace=True, z_loss_first=False), expected, **FLOAT64
        )


def test_inplace_backward_twice_raises(impl):
    logits, labels = random_case(2, 6, 31)
    loss = bs_token_loss(leaf(logits) * 1.0, labels, impl=impl, inplace_backward=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=INPLACE_ERROR):
        loss.backward()


def test_out_of_place_backward_twice_accumulates(impl):
    logits, labels = random_case(2, 6, 31)
    source = leaf(logits)
    loss = bs_token_loss(source, labels, impl=impl)
    (once,) = torch.autograd.grad(loss, source, retain_graph=True)
    loss.backward(retain_graph=True)
    loss.backward()
    torch.testing.assert_close(source.grad, 2 * once, **FLOAT64)


def _non_finite_case():
    """[2, 6, 13] float64 logits, shift=True: row (b, t) predicts labels[b, t + 1]. Counted rows hold a -inf label
    logit, a NaN, a +inf, only -inf, and masked (-inf) vocabulary; ignored rows (label -100, and the last position)
    hold NaN and +inf."""
    logits, labels = random_case(2, 6, 13, ignored_prefix=0)
    labels[0, 2] = -100
    label_of = lambda b, t: int(labels[b, t + 1])  # noqa: E731
    logits[0, 0, label_of(0, 0)] = float("-inf")  # the label's own logit is -inf
    logits[0, 1, 4] = float("nan")  # row 1 predicts the ignored label: ignored
    logits[0, 1, 7] = float("inf")
    logits[0, 2, 3] = float("nan")  # counted: no distribution
    logits[0, 3, 5] = float("inf")  # counted: no distribution
    logits[0, 4] = float("-inf")  # counted: no finite logit at all
    logits[0, 5] = float("nan")  # last position: ignored under shift=True
    masked = torch.ones(13, dtype=torch.bool)
    masked[[label_of(1, 0), 2, 9]] = False
    logits[1, 0, masked] = float("-inf")  # masked vocabulary: 3 finite entries, fewer than top_k
    logits[1, 5, 0] = float("inf")  # last position: ignored
    return logits, labels


NO_DISTRIBUTION = ((0, 2), (0, 3), (0, 4))  # (b, t) of counted rows whose lse is not finite
IGNORED = ((0, 1), (0, 5), (1, 5))


@pytest.mark.parametrize(("lam", "detach_belief"), [(0.0, True), (0.2, False), (1.0, False)])
def test_non_finite_logits_follow_the_documented_rules(impl, lam, detach_belief):
    logits, labels = _non_finite_case()
    options = dict(lam=lam, top_k=5, detach_belief=detach_belief, reduction="none")
    results = {}
    for name in ("reference", impl):
        source = leaf(logits)
        values = bs_token_loss(source, labels, impl=name, **options)
        values.backward(torch.ones_like(values))
        results[name] = values.detach(), source.grad
    expected_values, expected_grad = results["reference"]
    values, grad = results[impl]
    torch.testing.assert_close(values, expected_values, equal_nan=True, **FLOAT64)
    torch.testing.assert_close(grad, expected_grad, equal_nan=True, **FLOAT64)

    # The rules themselves, so that the reference cannot drift from them unseen.
    for b, t in NO_DISTRIBUTION:
        assert values[b, t].isnan() and grad[b, t].isnan().all(), (b, t)
    for b, t in IGNORED:
        assert (grad[b, t] == 0).all(), (b, t)
    assert values[0, 1] == 0
    label_is_minus_inf = values[0, 0]
    assert label_is_minus_inf == float("-inf") if lam < 1 else torch.isfinite(label_is_minus_inf)
    finite_rows = torch.ones(2, 6, dtype=torch.bool)
    for b, t in NO_DISTRIBUTION:
        finite_rows[b, t] = False
    assert torch.isfinite(grad[finite_rows]).all()
    assert (grad[1, 0][torch.isneginf(logits[1, 0])] == 0).all()


def test_forget_logprobs_non_finite(impl):
    logits, labels = _non_finite_case()
    for name in ("reference", impl):
        source = leaf(logits)
        values = forget_logprobs(source, labels, impl=name)
        values.sum().backward()
        if name == "reference":
            expected = values.detach(), source.grad
    torch.testing.assert_close(values.detach(), expected[0], equal_nan=True, **FLOAT64)
    torch.testing.assert_close(source.grad, expected[1], equal_nan=True, **FLOAT64)
    assert values[0, 0] == float("-inf") and values[0, 2].isnan() and values[0, 1] == 0


@pytest.mark.parametrize("reduction", ["sequence_mean", "token_mean", "sum"])
def test_ignored_positions_holding_nan_and_inf_get_zero_gradient(impl, reduction):
    logits, labels = random_case(3, 5, 17)  # labels[:, :2] are -100: rows 0 of each sequence are ignored
    logits[:, 0, 3] = float("nan")
    logits[:, 0, 4] = float("inf")
    logits[:, -1, 5] = float("nan")  # the last position under shift=True
    logits[:, -1, 6] = float("inf")
    source = leaf(logits)
    loss = bs_token_loss(source, labels, impl=impl, reduction=reduction)
    loss.backward()
    assert torch.isfinite(loss)
    assert (source.grad[:, 0] == 0).all() and (source.grad[:, -1] == 0).all()
    reference = leaf(logits)
    bs_token_loss(reference, labels, impl="reference", reduction=reduction).backward()
    torch.testing.assert_close(source.grad, reference.grad, **FLOAT64)


@pytest.mark.parametrize("scale", [1e4, 1e30])
def test_large_logits_keep_float32_accuracy(impl, scale):
    """Every impl against float64 within the float32 tolerance, however large the logits (issue 15: the torch
    backend's error grew with |z|)."""
    logits, labels = random_case(2, 9, 64, scale=scale)
    logits32 = logits.to(torch.float32)
    results = {}
    for name, x in (("reference", logits32.double()), (impl, logits32)):
        source = leaf(x)
        loss = bs_token_loss(source, labels, impl=name, lam=0.3, top_k=4, reduction="token_mean")
        loss.backward()
        results[name] = loss.detach(), source.grad
    tolerance = TOLERANCES[torch.float32]
    torch.testing.assert_close(results[impl][0].double(), results["reference"][0], rtol=tolerance["rtol"], atol=0)
    torch.testing.assert_close(results[impl][1].double(), results["reference"][1], **tolerance)


def test_one_dimensional_logits(impl):
    logits = torch.randn(11, dtype=torch.float64)
    label = torch.tensor(4)
    expected = bs_token_loss(logits, label, impl="reference", shift=False, reduction="none", top_k=3)
    value = bs_token_loss(logits, label, impl=impl, shift=False, reduction="none", top_k=3)
    assert value.shape == () and expected.shape == ()
    torch.testing.assert_close(value, expected, **FLOAT64)
    torch.testing.assert_close(
        forget_logprobs(logits, label, impl=impl, shift=False), torch.log_softmax(logits, -1)[4], **FLOAT64
    )


@pytest.mark.parametrize("impl", ["auto", "torch", "native", "triton", "reference"])
def test_meta_tensors_infer_shapes(impl):
    """Meta tensors (shape inference) reach the operators' fake implementations: shapes and dtypes, no values."""
    logits = torch.empty(2, 5, 11, device="meta", requires_grad=True)
    labels = torch.zeros(2, 5, dtype=torch.int64, device="meta")
    values = bs_token_loss(logits, labels, impl=impl, reduction="none")
    assert values.device.type == "meta" and values.shape == (2, 4) and values.dtype == torch.float32
    values.sum().backward()
    assert logits.grad.device.type == "meta" and logits.grad.shape == logits.shape


def test_inplace_backward_must_be_a_bool():
    logits, labels = random_case(1, 4, 7)
    with pytest.raises(TypeError, match="inplace_backward"):
        bs_token_loss(logits, labels, inplace_backward="yes")
    # The vocabulary-parallel form checks it before it looks for a process group (none exists here).
    with pytest.raises(TypeError, match="inplace_backward"):
        vocab_parallel_bs_token_loss(logits, labels, 0, inplace_backward="yes")
