"""Regression tests of issue 26's kernel-API items: second derivatives and torch.func (items 4, 15), bool flags
(item 5), precision at large logit magnitude (item 6), the belief temperature's float32 range (item 7) and
ignore_index's int64 range (item 14). torch.compile(dynamic=True) (item 12) is in test_compile.py.

The impl axis (conftest.py) runs every kernel impl; impl="triton" runs in the TRITON_INTERPRET=1 subprocess of
test_triton_interpreter.py, so its cases stay tiny.
"""

from __future__ import annotations

import pytest
import torch
from cases import leaf, random_case
from conftest import KERNEL_IMPLS, TOLERANCES, impl_param

from bs_kernels import (
    BSTokenLoss,
    bs_linear_loss,
    bs_token_loss,
    check_loss_options,
    forget_logprobs,
    linear_forget_logprobs,
    vocab_parallel_bs_token_loss,
    vocab_parallel_forget_logprobs,
    vocab_parallel_linear_loss,
)
from bs_kernels.backends import native

FLOAT32 = TOLERANCES[torch.float32]
SECOND_ORDER_ERROR = "second derivatives .* not supported by the kernel impls"
FUNCTORCH_ERROR = "torch.func transforms .* not supported"


def _linear_case(vocab: int = 13, hidden: int = 4):
    generator = torch.Generator().manual_seed(5)
    h = torch.randn(2, 5, hidden, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, hidden, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, vocab, (2, 5), generator=generator)
    return h, weight, labels


# ---- items 4 and 15: second derivatives ------------------------------------------------------------------------


def _token_loss(impl):
    logits, labels = random_case(2, 5, 13)
    x = leaf(logits)
    return bs_token_loss(x, labels, impl=impl, top_k=3), x


def _linear_loss(impl, reduction="token_mean"):
    h, weight, labels = _linear_case()
    return bs_linear_loss(h, weight, labels, impl=impl, top_k=3, reduction=reduction).sum(), h


def _linear_logprobs(impl):
    h, weight, labels = _linear_case()
    return linear_forget_logprobs(h, weight, labels, impl=impl).sum(), h


SECOND_ORDER_CASES = {
    "bs_token_loss": _token_loss,
    "bs_linear_loss": _linear_loss,
    "bs_linear_loss_none": lambda impl: _linear_loss(impl, reduction="none"),
    "linear_forget_logprobs": _linear_logprobs,
}


@pytest.mark.parametrize("case", list(SECOND_ORDER_CASES))
def test_create_graph_is_refused_the_same_way(impl, case):
    """Before: bs_linear_loss returned a gradient detached from the graph (a gradient penalty got a zero
    second-order term, silently) and bs_token_loss failed inside torch. Now both raise the same error."""
    loss, x = SECOND_ORDER_CASES[case](impl)
    with pytest.raises(RuntimeError, match=SECOND_ORDER_ERROR):
        torch.autograd.grad(loss, x, create_graph=True)
    # A first-order backward of the same graph still works.
    loss, x = SECOND_ORDER_CASES[case](impl)
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("case", list(SECOND_ORDER_CASES))
def test_reference_supports_second_derivatives(case):
    """impl="reference" (what the error recommends) is differentiated by autograd: the penalty's gradient is real."""
    loss, x = SECOND_ORDER_CASES[case]("reference")
    (grad,) = torch.autograd.grad(loss, x, create_graph=True)
    (second,) = torch.autograd.grad(grad.square().sum(), x)
    assert second.abs().sum() > 0


@pytest.mark.parametrize("transform", ["grad", "vmap"])
def test_torch_func_is_refused_with_a_clear_message(impl, transform):
    logits, labels = random_case(2, 5, 13)
    h, weight, linear_labels = _linear_case()
    token = lambda x: bs_token_loss(x, labels, impl=impl, top_k=3)  # noqa: E731
    linear = lambda x: bs_linear_loss(x, weight, linear_labels, impl=impl, top_k=3)  # noqa: E731
    for function, x in ((token, logits), (linear, h.detach())):
        if transform == "grad":
            call = torch.func.grad(function)
        else:
            call, x = torch.func.vmap(function), x.unsqueeze(0).expand(2, *x.shape)
        with pytest.raises(RuntimeError, match=FUNCTORCH_ERROR):
            call(x)


def test_torch_func_grad_with_the_reference():
    """What the message recommends: torch.func.grad of impl="reference" equals its autograd gradient."""
    logits, labels = random_case(2, 5, 13)
    value = torch.func.grad(lambda x: bs_token_loss(x, labels, impl="reference", top_k=3))(logits)
    x = leaf(logits)
    bs_token_loss(x, labels, impl="reference", top_k=3).backward()
    torch.testing.assert_close(value, x.grad, **TOLERANCES[torch.float64])


# ---- item 5: flags are bools -----------------------------------------------------------------------------------


def _entry_points():
    logits, labels = random_case(2, 5, 13)
    h, weight, linear_labels = _linear_case()
    return {
        "bs_token_loss": lambda **flags: bs_token_loss(logits, labels, impl="torch", **flags),
        "forget_logprobs": lambda **flags: forget_logprobs(logits, labels, impl="torch", **flags),
        "BSTokenLoss": lambda **flags: BSTokenLoss(impl="torch", **flags)(logits, labels),
        "bs_linear_loss": lambda **flags: bs_linear_loss(h, weight, linear_labels, impl="torch", **flags),
        "linear_forget_logprobs": lambda **flags: linear_forget_logprobs(h, weight, linear_labels, **flags),
        # Checked before the first collective: no process group is needed to see the error.
        "vocab_parallel_bs_token_loss": lambda **flags: vocab_parallel_bs_token_loss(logits, labels, 0, **flags),
        "vocab_parallel_forget_logprobs": lambda **flags: vocab_parallel_forget_logprobs(logits, labels, 0, **flags),
        "vocab_parallel_linear_loss": lambda **flags: vocab_parallel_linear_loss(h, weight, linear_labels, 0, **flags),
    }


FLAG_CASES = [
    ("bs_token_loss", "shift"),
    ("bs_token_loss", "return_stats"),
    ("bs_token_loss", "inplace_backward"),
    ("forget_logprobs", "shift"),
    ("BSTokenLoss", "shift"),
    ("bs_linear_loss", "shift"),
    ("bs_linear_loss", "return_stats"),
    ("bs_linear_loss", "accumulate_in_fp32"),
    ("linear_forget_logprobs", "shift"),
    ("vocab_parallel_bs_token_loss", "shift"),
    ("vocab_parallel_bs_token_loss", "return_stats"),
    ("vocab_parallel_bs_token_loss", "inplace_backward"),
    ("vocab_parallel_forget_logprobs", "shift"),
    ("vocab_parallel_linear_loss", "shift"),
    ("vocab_parallel_linear_loss", "return_stats"),
]


@pytest.mark.parametrize(("entry_point", "flag"), FLAG_CASES, ids=[f"{e}-{f}" for e, f in FLAG_CASES])
@pytest.mark.parametrize("value", ["False", 0, torch.tensor(False)], ids=["string", "int", "tensor"])
def test_flags_must_be_bools(entry_point, flag, value):
    """Before: shift="False" behaved as shift=True (a truthy string)."""
    with pytest.raises(TypeError, match=f"{flag} must be a bool"):
        _entry_points()[entry_point](**{flag: value})


# ---- item 6: precision at large logit magnitude ------------------------------------------------------------------

PRECISION_IMPLS = ["reference", *(impl_param(name) for name in KERNEL_IMPLS)]
# "none" (summed afterwards) takes every impl's forward/backward pair; a scalar reduction of logits that require grad
# takes the one-pass path on impl="native" (bs_kernels/one_pass.py: the gradient written by the forward kernel).
PRECISION_REDUCTIONS = ["none", "token_mean", "sum"]


@pytest.fixture
def one_pass_runs(monkeypatch):
    """How many times native.forward_grad (the one-pass kernel) ran."""
    calls = []
    original = native.forward_grad

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(native, "forward_grad", spy)
    return calls


def _against_float64(impl, logits32, labels, reduction="none", **options):
    """(value, gradient) of impl on float32 logits and of the reference on the same values in float64."""
    results = []
    for name, x in ((impl, logits32), ("reference", logits32.double())):
        source = leaf(x)
        value = bs_token_loss(source, labels, impl=name, shift=False, reduction=reduction, **options)
        value.sum().backward()
        results.append((value.detach().double(), source.grad.double()))
    return results


def _check_path(impl, reduction, one_pass_runs):
    """The case ran where it was meant to: the one pass exactly for a scalar reduction on impl="native"."""
    assert len(one_pass_runs) == (1 if impl == "native" and reduction != "none" else 0)


@pytest.mark.parametrize("impl", PRECISION_IMPLS)
@pytest.mark.parametrize("reduction", PRECISION_REDUCTIONS)
def test_constant_logits_at_minus_1e10(impl, reduction, one_pass_runs):
    """All logits equal to -1e10: log p = -log V exactly. Before: torch and native gave 0 (z - lse with lse rounded
    to the ulp of 1e10), and a zero gradient where the true one is e_y - 1/V."""
    logits = torch.full((1, 2, 5), -1e10)
    labels = torch.tensor([[1, 2]])
    expected = torch.full((1, 2), -torch.log(torch.tensor(5.0)).item())
    torch.testing.assert_close(forget_logprobs(logits, labels, impl=impl, shift=False), expected, **FLOAT32)
    # top_k = V: every logit is tied, and ties may pick any k of them (docs/math.md); all V pick the same.
    (value, grad), (reference_value, reference_grad) = _against_float64(
        impl, logits, labels, reduction, top_k=5, lam=0.4
    )
    _check_path(impl, reduction, one_pass_runs)
    torch.testing.assert_close(value, reference_value, **FLOAT32)
    torch.testing.assert_close(grad, reference_grad, **FLOAT32)
    assert grad.abs().amax() > 0.1


@pytest.mark.parametrize("impl", PRECISION_IMPLS)
@pytest.mark.parametrize("reduction", PRECISION_REDUCTIONS)
@pytest.mark.parametrize("detach_belief", [True, False], ids=["detached", "attached"])
def test_offset_logits_at_1e4(impl, reduction, detach_belief, one_pass_runs):
    """randn * 3 + 1e4 over V = 1000: values and gradients within float32 accuracy of float64 on the same (float32)
    logits. Before: errors of 4.8e-4 in log p (z - lse with lse rounded at the ulp of 1e4), gradients likewise;
    a temperature != 1 also rounded v / tau at that magnitude."""
    generator = torch.Generator().manual_seed(7)
    logits = (torch.randn(2, 3, 1000, generator=generator) * 3 + 1e4).to(torch.float32)
    labels = torch.randint(0, 1000, (2, 3), generator=generator)
    (value, grad), (reference_value, reference_grad) = _against_float64(
        impl, logits, labels, reduction, top_k=4, lam=0.3, belief_temperature=0.7, detach_belief=detach_belief
    )
    _check_path(impl, reduction, one_pass_runs)
    torch.testing.assert_close(value, reference_value, **FLOAT32)
    torch.testing.assert_close(grad, reference_grad, **FLOAT32)
    logprobs = forget_logprobs(logits, labels, impl=impl, shift=False).double()
    expected = torch.log_softmax(logits.double(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logprobs, expected, **FLOAT32)


@pytest.mark.parametrize("impl", [impl_param(name) for name in KERNEL_IMPLS])
@pytest.mark.parametrize("reduction", ["none", "token_mean"])
def test_fused_linear_at_large_magnitude(impl, reduction, one_pass_runs):
    """bs_linear_loss goes through the same backends: a bias of 1e4 shifts every logit, nothing else changes. A
    scalar reduction forms the gradient in forward (on impl="native" in the kernel's own pass over each chunk)."""
    h, weight, labels = _linear_case(vocab=300)
    h32, weight32 = h.detach().float(), weight.float()
    bias32 = torch.full((300,), 1e4)
    results = []
    for name, (x, w, b) in ((impl, (h32, weight32, bias32)), ("reference", (h32.double(), weight32.double(), None))):
        source = leaf(x)
        value = bs_linear_loss(source, w, labels, bias=b, impl=name, top_k=4, reduction=reduction)
        value.sum().backward()
        results.append((value.detach().double(), source.grad.double()))
    # The float32 bias rounds each logit to the ulp of 1e4 (1e-3), so compare with the same logits in float64.
    (value, grad), _ = results
    logits = (h32 @ weight32.T + bias32).double()
    source = leaf(logits)
    reference = bs_token_loss(source, labels, impl="reference", top_k=4, reduction=reduction)
    reference.sum().backward()
    assert (len(one_pass_runs) > 0) == (impl == "native" and reduction != "none")
    torch.testing.assert_close(value, reference.detach(), **FLOAT32)
    torch.testing.assert_close(grad, (source.grad @ weight32.double()), **FLOAT32)


# ---- items 7 and 14: the float32 range of the temperature, the int64 range of ignore_index -----------------------


@pytest.mark.parametrize("temperature", [5e-324, 1e-39, 1e39, float("inf"), float("nan")])
def test_belief_temperature_outside_float32(temperature):
    """5e-324 is 0 in float32 (before: accepted; reference NaN, kernels finite); 1e-39's reciprocal overflows float32
    and 1e39 is inf in float32."""
    logits, labels = random_case(1, 4, 7)
    with pytest.raises(ValueError, match="belief_temperature must be in"):
        bs_token_loss(logits, labels, impl="torch", belief_temperature=temperature)
    with pytest.raises(ValueError, match="belief_temperature must be in"):
        check_loss_options(belief_temperature=temperature)


def test_belief_temperature_at_the_edges_of_float32():
    """The smallest and largest accepted temperatures give finite values on every path."""
    logits, labels = random_case(1, 4, 7)
    for temperature in (torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max):
        for impl in ("reference", "torch"):
            assert torch.isfinite(bs_token_loss(logits.float(), labels, impl=impl, belief_temperature=temperature))


@pytest.mark.parametrize("ignore_index", [2**63, -(2**63) - 1, 2**70])
def test_ignore_index_outside_int64(ignore_index):
    """Before: 2**70 failed deep inside torch (an int64 overflow)."""
    logits, labels = random_case(1, 4, 7)
    h, weight, linear_labels = _linear_case()
    calls = (
        lambda: bs_token_loss(logits, labels, ignore_index=ignore_index),
        lambda: forget_logprobs(logits, labels, ignore_index=ignore_index),
        lambda: bs_linear_loss(h, weight, linear_labels, ignore_index=ignore_index),
        lambda: check_loss_options(ignore_index=ignore_index),
    )
    for call in calls:
        with pytest.raises(ValueError, match="ignore_index must fit in int64"):
            call()
    # The int64 bounds themselves are valid ignore_index values.
    largest = torch.where(labels == -100, 2**63 - 1, labels)
    reference = bs_token_loss(logits, labels, impl="reference")
    torch.testing.assert_close(bs_token_loss(logits, largest, ignore_index=2**63 - 1, impl="torch"), reference)


@pytest.mark.parametrize("impl", [impl_param("triton")])
@pytest.mark.parametrize("kernel", ["buckets", "lanes"])
def test_triton_forward_kernels_keep_the_max_apart(impl, kernel):
    """Both Triton forwards at randn * 3 + 1e4: m exact, log_sum within float32 accuracy of float64. Before, the
    per-lane kernel's base-2 shift z * log2(e) - m * log2(e) rounded both products at the ulp of 1.4e4."""
    from bs_kernels.backends import triton_launch

    if kernel == "lanes":
        config = triton_launch.LaneForwardConfig(groups=2, num_warps=1, vec=1)
    else:
        config = triton_launch.ForwardConfig(block_v=64, buckets=32, num_warps=4)
    generator = torch.Generator().manual_seed(8)
    logits = (torch.randn(3, 300, generator=generator) * 3 + 1e4).to(torch.float32)
    labels = torch.tensor([0, -1, 7])
    raw = triton_launch.forward(logits, labels, 4, config=config)
    exact = logits.double()
    row_max = exact.amax(-1)
    torch.testing.assert_close(raw.row_max.double(), row_max, atol=0, rtol=0)
    expected = torch.logsumexp(exact - row_max.unsqueeze(-1), dim=-1)
    torch.testing.assert_close(raw.log_sum.double(), expected, atol=1e-6, rtol=1e-6)
