"""torch.compile(fullgraph=True) traces every entry point with every impl, and matches eager (issue 15, defect 5), with
dynamic shapes too (issue 26, item 12).

Labels hold -100 (where a public fused cross-entropy gave wrong compiled losses). Most cases use the "aot_eager"
backend (tracing and autograd, no code generation); one runs inductor end to end. Compiling costs seconds of CPU per
graph, so each entry point gets one small graph; every impl runs through bs_token_loss, and the other entry points
reach the same operators.
"""

from __future__ import annotations

import pytest
import torch
from cases import leaf, random_case
from conftest import KERNEL_IMPLS, TOLERANCES, impl_param

from bs_kernels import bs_linear_loss, bs_token_loss, forget_logprobs, linear_forget_logprobs

FLOAT64 = TOLERANCES[torch.float64]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _value_and_grads(function, *inputs):
    leaves = [leaf(x) for x in inputs]
    value = function(*leaves)
    value.sum().backward()
    return value.detach(), [x.grad for x in leaves]


def _assert_compiled_matches_eager(function, *inputs, backend="aot_eager", tolerance=FLOAT64, dynamic=None):
    eager_value, eager_grads = _value_and_grads(function, *inputs)
    compiled = torch.compile(function, fullgraph=True, backend=backend, dynamic=dynamic)
    value, grads = _value_and_grads(compiled, *inputs)
    torch.testing.assert_close(value, eager_value, **tolerance)
    for grad, eager_grad in zip(grads, eager_grads):
        torch.testing.assert_close(grad, eager_grad, **tolerance)


@pytest.mark.parametrize("dynamic", [None, True], ids=["default", "dynamic"])
@pytest.mark.parametrize("impl", ["reference", *(impl_param(name) for name in KERNEL_IMPLS)])
def test_bs_token_loss_compiles(impl, dynamic):
    """With dynamic=True (issue 26, item 12) dynamo could not trace the temperature check's math.isfinite (on the
    default temperature 1.0)."""
    logits, labels = random_case(2, 6, 29)
    labels[1, 4] = -100  # an ignored position inside a sequence too

    def loss(x):
        return bs_token_loss(x, labels, impl=impl, top_k=5, detach_belief=False)

    _assert_compiled_matches_eager(loss, logits, dynamic=dynamic)


def test_forget_logprobs_compiles():
    logits, labels = random_case(2, 6, 29)
    _assert_compiled_matches_eager(lambda x: forget_logprobs(x, labels), logits)


@pytest.mark.parametrize("dynamic", [None, True], ids=["default", "dynamic"])
def test_linear_entry_points_compile(dynamic):
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 6, 8, generator=generator, dtype=torch.float64)
    weight = torch.randn(29, 8, generator=generator, dtype=torch.float64)
    bias = torch.randn(29, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 29, (2, 6), generator=generator)
    labels[:, :2] = -100

    def loss(h, w, b):
        value = bs_linear_loss(h, w, labels, bias=b, top_k=5, reduction="none")
        return value + linear_forget_logprobs(h, w, labels, bias=b)

    _assert_compiled_matches_eager(loss, hidden, weight, bias, dynamic=dynamic)


def test_inductor_end_to_end():
    """The default impl through inductor's generated code, float32 (the dtype models train in)."""
    logits, labels = random_case(2, 5, 23, dtype=torch.float32)

    def loss(x):
        return bs_token_loss(x, labels, top_k=4)

    _assert_compiled_matches_eager(loss, logits, backend="inductor", tolerance=TOLERANCES[torch.float32])


def test_out_of_range_label_is_caught_when_compiled():
    logits, labels = random_case(2, 5, 23)
    labels[0, 3] = 23
    compiled = torch.compile(lambda x: bs_token_loss(x, labels, impl="torch"), fullgraph=True, backend="aot_eager")
    with pytest.raises(RuntimeError, match=r"labels contains a value outside \[0, 23\)"):
        compiled(logits)
