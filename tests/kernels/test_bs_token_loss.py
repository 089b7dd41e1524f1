"""The shared parametrisation: every kernel impl against the float64 reference, values and gradients.

The `impl` fixture (conftest.py) runs each test for "torch", "native" and "triton", skipping those that cannot run.
"""

from __future__ import annotations

import pytest
import torch
from cases import leaf, random_case, with_masked_vocabulary
from conftest import TOLERANCES

from bs_kernels import BSTokenLoss, bs_token_loss, forget_logprobs

REDUCTIONS = ("sequence_mean", "token_mean", "sum", "none")


def run(logits, labels, impl, **options):
    """Loss, stats and the gradient of sum(loss * w), w = linspace(1, 2) (w = 1 for a scalar loss)."""
    x = leaf(logits)
    loss, stats = bs_token_loss(x, labels, impl=impl, return_stats=True, **options)
    weights = torch.linspace(1.0, 2.0, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    (grad,) = torch.autograd.grad((loss * weights).sum(), x)
    return loss.detach(), stats, grad


def assert_close(actual, expected, dtype):
    tolerance = TOLERANCES[dtype]
    torch.testing.assert_close(actual.to(torch.float64), expected.to(torch.float64), **tolerance)


def assert_same_beliefs(stats, expected_stats, valid):
    """Belief ids as sets per valid position (the order is not part of the contract), probabilities matched by id."""
    ids, expected_ids = stats.belief_ids[valid].sort(-1), expected_stats.belief_ids[valid].sort(-1)
    torch.testing.assert_close(ids.values, expected_ids.values)
    probs = stats.belief_probs[valid].gather(-1, ids.indices).to(torch.float64)
    expected_probs = expected_stats.belief_probs[valid].gather(-1, expected_ids.indices).to(torch.float64)
    torch.testing.assert_close(probs, expected_probs, atol=1e-6, rtol=1e-5)


CASES = {
    # name: (batch, length, vocab, extra options)
    "odd_vocab": (2, 9, 37, {}),
    "k_at_least_vocab": (2, 6, 13, {"top_k": 20}),
    "k_equals_one": (2, 6, 29, {"top_k": 1}),
    "one_row": (1, 2, 31, {}),
    "temperature": (3, 5, 41, {"belief_temperature": 0.6}),
    "large_vocab": (1, 3, 70_001, {"top_k": 7}),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("detach_belief", [True, False], ids=["detached", "attached"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(impl, case, detach_belief, dtype):
    batch, length, vocab, extra = CASES[case]
    logits, labels = random_case(batch, length, vocab, ignored_prefix=min(2, length - 1))
    options = dict(lam=0.2, top_k=5, detach_belief=detach_belief, reduction="none") | extra
    loss, stats, grad = run(logits.to(dtype), labels, impl, **options)
    ref_loss, ref_stats, ref_grad = run(logits, labels, "reference", **options)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert grad.dtype == dtype
    assert_close(loss, ref_loss, dtype)
    assert_close(stats.token_logprobs, ref_stats.token_logprobs, dtype)
    assert_close(grad, ref_grad, dtype)
    assert_same_beliefs(stats, ref_stats, labels[:, 1:] != -100)


@pytest.mark.parametrize("detach_belief", [True, False], ids=["detached", "attached"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reductions(impl, reduction, detach_belief):
    logits, labels = random_case(3, 8, 23)
    labels[1, :] = -100  # a fully ignored sequence: left out of sequence_mean's average over sequences
    labels[2, 2:5] = -100
    options = dict(reduction=reduction, detach_belief=detach_belief, top_k=4)
    loss, _, grad = run(logits, labels, impl, **options)
    ref_loss, _, ref_grad = run(logits, labels, "reference", **options)
    assert_close(loss, ref_loss, torch.float64)
    assert_close(grad, ref_grad, torch.float64)
    assert torch.all(grad[1] == 0)


@pytest.mark.parametrize("lam", [0.0, 0.2, 1.0])
def test_lam(impl, lam):
    logits, labels = random_case(2, 7, 19)
    loss, _, grad = run(logits, labels, impl, lam=lam, top_k=6)
    ref_loss, _, ref_grad = run(logits, labels, "reference", lam=lam, top_k=6)
    assert_close(loss, ref_loss, torch.float64)
    assert_close(grad, ref_grad, torch.float64)


def test_reduction_values_by_hand(impl):
    """sequence_mean / token_mean / sum from the per-position values, computed here independently."""
    logits, labels = random_case(3, 6, 17)
    labels[0, 2:] = -100  # sequence 0 has no valid (shifted) position
    labels[2, 4] = -100
    per_position = bs_token_loss(logits, labels, impl=impl, reduction="none")
    valid = labels[:, 1:] != -100
    counts = valid.sum(-1)
    expected_sequence_mean = torch.stack([per_position[b][valid[b]].mean() for b in (1, 2)]).mean()
    torch.testing.assert_close(bs_token_loss(logits, labels, impl=impl), expected_sequence_mean)
    torch.testing.assert_close(
        bs_token_loss(logits, labels, impl=impl, reduction="token_mean"), per_position.sum() / counts.sum()
    )
    torch.testing.assert_close(bs_token_loss(logits, labels, impl=impl, reduction="sum"), per_position[valid].sum())
    assert torch.all(per_position[~valid] == 0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_ignored_gives_zero_and_zero_gradient(impl, reduction):
    logits, labels = random_case(2, 5, 11)
    labels[:] = -100
    x = leaf(logits)
    loss = bs_token_loss(x, labels, impl=impl, reduction=reduction)
    loss.sum().backward()
    assert torch.all(loss == 0)
    assert torch.all(x.grad == 0)


@pytest.mark.parametrize("detach_belief", [True, False], ids=["detached", "attached"])
def test_negative_infinite_logits(impl, detach_belief):
    """Masked vocabulary entries: finite loss and gradients, equal to the reference; k exceeds the finite entries."""
    logits, labels = random_case(2, 6, 12)
    logits = with_masked_vocabulary(logits, labels, fraction=0.7)
    logits[0, 3, :] = float("-inf")  # a position whose logits are all masked ...
    labels[0, 4] = -100  # ... is ignored (it predicts labels[0, 4])
    options = dict(top_k=8, detach_belief=detach_belief, reduction="none")
    loss, stats, grad = run(logits, labels, impl, **options)
    ref_loss, ref_stats, ref_grad = run(logits, labels, "reference", **options)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert torch.isfinite(stats.token_logprobs).all()
    assert_close(loss, ref_loss, torch.float64)
    assert_close(grad, ref_grad, torch.float64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("detach_belief", [True, False], ids=["detached", "attached"])
def test_error_budget_low_precision(impl, dtype, detach_belief):
    """Error against the float64 reference no larger than an eager computation in the same dtype, plus a little."""
    logits, labels = random_case(2, 9, 37)
    low = logits.to(dtype)
    exact = low.to(torch.float64)  # the reference sees exactly the rounded inputs
    options = dict(detach_belief=detach_belief, top_k=5, reduction="none")
    loss, _, grad = run(low, labels, impl, **options)
    ref_loss, _, ref_grad = run(exact, labels, "reference", **options)
    eager_loss, eager_grad = eager_same_dtype(low, labels, **options)
    tolerance = TOLERANCES[dtype]
    value_error = (loss.double() - ref_loss).abs().max()
    grad_error = (grad.double() - ref_grad).abs().max()
    assert value_error <= (eager_loss.double() - ref_loss).abs().max() + tolerance["atol"]
    assert grad_error <= (eager_grad.double() - ref_grad).abs().max() + tolerance["atol"]


def eager_same_dtype(logits, labels, *, detach_belief, top_k, reduction):
    """The authors' formula evaluated entirely in the input's low precision dtype (the budget's yardstick)."""
    assert reduction == "none"
    x = leaf(logits)
    shifted_logits, shifted_labels = x[:, :-1], labels[:, 1:]
    valid = shifted_labels != -100
    log_probs = torch.log_softmax(shifted_logits, dim=-1)
    values, ids = shifted_logits.topk(top_k, dim=-1)
    belief = torch.softmax(values, dim=-1)
    if detach_belief:
        belief = belief.detach()
    target = torch.zeros_like(log_probs).scatter(-1, ids, 0.2 * belief)
    target = target + 0.8 * torch.nn.functional.one_hot(shifted_labels.clamp(min=0), logits.shape[-1]).to(x.dtype)
    per_position = (target * log_probs).sum(-1) * valid
    weights = torch.linspace(0.5, 1.5, per_position.numel(), dtype=torch.float32).reshape(per_position.shape)
    (grad,) = torch.autograd.grad((per_position.float() * weights).sum(), x)
    return per_position.detach(), grad


def test_gradcheck(impl):
    """float64 finite differences through the whole public function (tie-free data, tiny shape).

    Only with detach_belief=False: with the stop-gradient the returned gradient (t - pi) is by design not the
    derivative of the value; that case is checked against the reference and against the closed form below.
    """
    logits, labels = random_case(2, 5, 9, scale=1.0)

    def loss_of(x):
        return bs_token_loss(x, labels, impl=impl, top_k=3, lam=0.4, detach_belief=False)

    assert torch.autograd.gradcheck(loss_of, (leaf(logits),), eps=1e-6, atol=1e-6)


def test_detached_gradient_closed_form(impl):
    """detach_belief=True: dl/dz = t - pi with t = lam * q on the top k + (1 - lam) e_y (docs/math.md), built here."""
    logits, labels = random_case(2, 6, 11)
    _, stats, grad = run(logits, labels, impl, lam=0.3, top_k=4, reduction="sum")
    shifted_labels = labels[:, 1:]
    valid = (shifted_labels != -100).unsqueeze(-1)
    target = torch.zeros(2, 5, 11, dtype=torch.float64).scatter(-1, stats.belief_ids, 0.3 * stats.belief_probs)
    target += 0.7 * torch.nn.functional.one_hot(shifted_labels.clamp(min=0), 11).double()
    expected = (target - torch.softmax(logits[:, :-1], -1)) * valid
    assert_close(grad[:, :-1], expected, torch.float64)
    assert torch.all(grad[:, -1] == 0)


def test_gradient_with_full_vocabulary_is_scaled_ga(impl):
    """k >= V, beliefs detached: dl/dz = lam * pi + (1 - lam) e_y - pi = (1 - lam) (e_y - pi), GA's gradient scaled."""
    logits, labels = random_case(2, 6, 15)
    _, _, grad = run(logits, labels, impl, lam=0.3, top_k=15, reduction="sum")
    x = leaf(logits)
    ga = forget_logprobs(x, labels, impl=impl).sum()
    (ga_grad,) = torch.autograd.grad(ga, x)
    assert_close(grad, 0.7 * ga_grad, torch.float64)


def test_lam_zero_is_forget_logprob(impl):
    logits, labels = random_case(2, 6, 21)
    loss = bs_token_loss(logits, labels, impl=impl, lam=0.0, reduction="none")
    assert_close(loss, forget_logprobs(logits, labels, impl=impl), torch.float64)


def test_forget_logprobs_values_and_gradient(impl):
    logits, labels = random_case(2, 7, 33)
    x = leaf(logits)
    token_logprobs = forget_logprobs(x, labels, impl=impl)
    valid = labels[:, 1:] != -100
    expected = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    assert token_logprobs.shape == labels[:, 1:].shape
    assert_close(token_logprobs, expected * valid, torch.float64)
    token_logprobs.sum().backward()
    one_hot = torch.nn.functional.one_hot(labels[:, 1:].clamp(min=0), 33).double()
    expected_grad = (one_hot - torch.softmax(logits[:, :-1], -1)) * valid.unsqueeze(-1)
    assert_close(x.grad[:, :-1], expected_grad, torch.float64)
    assert torch.all(x.grad[:, -1] == 0)


def test_flat_rows_without_shift(impl):
    logits, labels = random_case(1, 12, 19)
    flat_logits, flat_labels = logits[0], labels[0]
    loss = bs_token_loss(flat_logits, flat_labels, impl=impl, shift=False, reduction="token_mean")
    ref = bs_token_loss(flat_logits, flat_labels, impl="reference", shift=False, reduction="token_mean")
    assert_close(loss, ref, torch.float64)


def test_non_contiguous_logits(impl):
    """A [B, T, V] view whose rows are not adjacent in memory (T-major storage) and a custom ignore_index."""
    logits, labels = random_case(3, 6, 17)
    strided = logits.transpose(0, 1).contiguous().transpose(0, 1)
    labels = torch.where(labels == -100, torch.full_like(labels, 5), labels)
    loss, _, grad = run(strided, labels, impl, ignore_index=5)
    ref_loss, _, ref_grad = run(logits, labels, "reference", ignore_index=5)
    assert_close(loss, ref_loss, torch.float64)
    assert_close(grad, ref_grad, torch.float64)


def test_inplace_backward(impl):
    logits, labels = random_case(2, 6, 25, dtype=torch.float32)
    _, _, expected_grad = run(logits, labels, impl)
    storage = logits.clone().requires_grad_(True)
    loss = bs_token_loss(storage * 1.0, labels, impl=impl, inplace_backward=True)
    loss.backward()
    assert_close(storage.grad, expected_grad, torch.float32)


def test_module_matches_function(impl):
    logits, labels = random_case(2, 6, 25)
    module = BSTokenLoss(lam=0.5, top_k=3, reduction="token_mean", impl=impl)
    expected = bs_token_loss(logits, labels, lam=0.5, top_k=3, reduction="token_mean", impl=impl)
    assert_close(module(logits, labels), expected, torch.float64)
    assert "lam=0.5" in repr(module)
