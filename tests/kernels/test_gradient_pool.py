"""The native kernels' gradient pool (csrc/bs_token_native.cpp, GradientPool): the memory of the last freed [N, V]
gradient of 32 MiB or more is kept and the next gradient that fits is placed in it. A live gradient is never
reused, values do not depend on where the gradient lies, and the pool can be turned off and emptied."""

from __future__ import annotations

import pytest
import torch

from bs_kernels import bs_token_loss, forget_logprobs, one_pass
from bs_kernels.backends import native

NATIVE_REASON = native.unavailable_reason(torch.device("cpu"))
pytestmark = pytest.mark.skipif(NATIVE_REASON is not None, reason=str(NATIVE_REASON))

POOL_ENV = "BS_KERNELS_NATIVE_GRAD_POOL"
SHAPE = (2, 1024, 4096)  # float32: 32 MiB, the smallest gradient the pool keeps


@pytest.fixture(autouse=True)
def _empty_pool(monkeypatch):
    monkeypatch.delenv(POOL_ENV, raising=False)
    native.release_gradient_pool()
    yield
    native.release_gradient_pool()


def _inputs(shape=SHAPE):
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(shape, generator=generator) * 3).requires_grad_(True)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=generator)
    return logits, labels


def _step(logits, labels, loss=bs_token_loss):
    options = {"top_k": 20} if loss is bs_token_loss else {}
    value = loss(logits, labels, impl="native", **options)
    (value if value.dim() == 0 else value.sum()).backward()
    grad, logits.grad = logits.grad, None
    return grad


@pytest.mark.parametrize("path", ["one-pass", "two-pass"])
def test_a_freed_gradient_is_reused_with_the_same_values(monkeypatch, path):
    if path == "two-pass":
        monkeypatch.setenv(one_pass.TWO_PASS_ENV, "1")
    logits, labels = _inputs()
    first = _step(logits, labels)
    address, expected = first.data_ptr(), first.clone()
    del first
    assert native.gradient_pool_bytes() >= logits.numel() * 4
    second = _step(logits, labels)
    assert second.data_ptr() == address and native.gradient_pool_bytes() == 0
    assert torch.equal(second, expected)


def test_a_live_gradient_is_never_reused():
    logits, labels = _inputs()
    kept = _step(logits, labels)
    snapshot = kept.clone()
    other = _step(logits, labels)
    assert other.data_ptr() != kept.data_ptr()
    assert torch.equal(kept, snapshot) and torch.equal(other, snapshot)
    view = other[0]  # a view keeps the block alive too
    del other
    assert native.gradient_pool_bytes() == 0
    third = _step(logits, labels)
    assert third.data_ptr() != view.data_ptr() and torch.equal(third, snapshot)


def test_the_pool_keeps_one_block_and_can_be_off_or_emptied(monkeypatch):
    logits, labels = _inputs()
    larger, larger_labels = _inputs((2, 2048, 4096))
    both = (_step(logits, labels), _step(larger, larger_labels))
    del both  # two blocks freed: the larger is kept, the other returned to the system
    assert native.gradient_pool_bytes() == larger.numel() * 4
    smaller_fits = _step(logits, labels)  # placed in the larger block
    assert native.gradient_pool_bytes() == 0
    del smaller_fits
    native.release_gradient_pool()
    assert native.gradient_pool_bytes() == 0
    monkeypatch.setenv(POOL_ENV, "0")
    _step(logits, labels)
    assert native.gradient_pool_bytes() == 0
    monkeypatch.delenv(POOL_ENV)
    small, small_labels = _inputs((2, 64, 4096))  # 2 MiB: left to malloc
    _step(small, small_labels)
    assert native.gradient_pool_bytes() == 0


def test_forget_logprobs_gradients_use_it_too():
    logits, labels = _inputs()
    first = _step(logits, labels, forget_logprobs)
    address = first.data_ptr()
    del first
    assert _step(logits, labels, forget_logprobs).data_ptr() == address


@pytest.mark.parametrize("path", ["one-pass", "two-pass"])
@pytest.mark.parametrize("vocab", [4096, 4100], ids=["aligned_rows", "misaligned_rows"])
def test_streamed_gradients_equal_the_in_place_ones(monkeypatch, path, vocab):
    """Gradients of 32 MiB or more in their own memory are written with non-temporal stores (rows starting anywhere
    in a vector: V = 4100 moves each row's first aligned element); the values are those of the in-place path, which
    writes over the logits with plain stores, bit for bit."""
    if path == "two-pass":
        monkeypatch.setenv(one_pass.TWO_PASS_ENV, "1")
    logits, labels = _inputs((2, 1024, vocab))
    streamed = _step(logits, labels)
    assert streamed.nbytes >= 32 << 20
    in_place = logits.detach().clone().requires_grad_(True)
    value = bs_token_loss(in_place.clone(), labels, impl="native", top_k=20, inplace_backward=True)
    (expected,) = torch.autograd.grad(value, in_place)
    assert torch.equal(streamed, expected)
