"""Every bad input of docs/math.md's edge cases raises ValueError/TypeError naming the argument and the value."""

from __future__ import annotations

import pytest
import torch

from bs_kernels import BSTokenLoss, bs_token_loss, check_loss_options, forget_logprobs

LOGITS = torch.randn(2, 5, 11)
LABELS = torch.randint(0, 11, (2, 5))

BAD_OPTIONS = [
    (dict(top_k=0), ValueError, ["top_k", "0"]),
    (dict(top_k=2.5), TypeError, ["top_k", "2.5"]),
    (dict(lam=-0.1), ValueError, ["lam", "-0.1"]),
    (dict(lam=1.5), ValueError, ["lam", "1.5"]),
    (dict(lam=float("nan")), ValueError, ["lam", "nan"]),
    (dict(belief_temperature=0.0), ValueError, ["belief_temperature", "0.0"]),
    (dict(belief_temperature=-1.0), ValueError, ["belief_temperature", "-1.0"]),
    (dict(reduction="mean"), ValueError, ["reduction", "mean"]),
    (dict(impl="cuda"), ValueError, ["impl", "cuda"]),
    (dict(ignore_index=None), TypeError, ["ignore_index", "None"]),
    (dict(detach_belief="yes"), TypeError, ["detach_belief", "yes"]),
    (dict(lam="0.5"), TypeError, ["lam", "0.5"]),
    (dict(top_k=-3), ValueError, ["top_k", "-3"]),
    (dict(belief_temperature=float("inf")), ValueError, ["belief_temperature", "inf"]),
    (dict(ignore_index=1.5), TypeError, ["ignore_index", "1.5"]),
    (dict(impl=None), ValueError, ["impl", "None"]),
]


@pytest.mark.parametrize("options,error,words", BAD_OPTIONS)
def test_bad_options(options, error, words):
    with pytest.raises(error) as info:
        bs_token_loss(LOGITS, LABELS, **options)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("options,error,words", BAD_OPTIONS)
def test_check_loss_options_raises_what_the_loss_raises(options, error, words):
    """The public check, given only the options, fails with the loss's own error type and message."""
    with pytest.raises(error) as from_loss:
        bs_token_loss(LOGITS, LABELS, **options)
    with pytest.raises(error) as from_check:
        check_loss_options(**options)
    assert type(from_check.value) is type(from_loss.value)
    assert str(from_check.value) == str(from_loss.value)


def test_check_loss_options_accepts_good_options():
    assert check_loss_options() is None
    good = dict(lam=1.0, top_k=1, belief_temperature=0.5, detach_belief=False, ignore_index=-1, reduction="none")
    assert check_loss_options(**good, impl="torch") is None
    bs_token_loss(LOGITS, LABELS, **good, impl="torch")  # the loss takes them too


def test_bad_options_in_module():
    with pytest.raises(ValueError, match="top_k"):
        BSTokenLoss(top_k=0)


@pytest.mark.parametrize("bad_label", [11, 1000, -1, -7])
def test_label_out_of_range(bad_label):
    labels = LABELS.clone()
    labels[1, 3] = bad_label
    for fn in (bs_token_loss, forget_logprobs):
        with pytest.raises(ValueError, match=rf"labels contains {bad_label}\b.*\[0, 11\)"):
            fn(LOGITS, labels)


def test_integer_logits():
    with pytest.raises(TypeError, match="logits must be a floating tensor.*torch.int64"):
        bs_token_loss(LABELS.unsqueeze(-1).expand(2, 5, 11).contiguous(), LABELS)


def test_float_labels():
    with pytest.raises(TypeError, match="labels must be an integer tensor.*torch.float32"):
        bs_token_loss(LOGITS, LABELS.float())


@pytest.mark.parametrize(
    "logits,labels,shift",
    [
        (torch.randn(2, 5, 11), torch.randint(0, 11, (2, 4)), True),
        (torch.randn(10, 11), torch.randint(0, 11, (10,)), True),
        (torch.randn(10, 11), torch.randint(0, 11, (9,)), False),
    ],
)
def test_shape_mismatch(logits, labels, shift):
    with pytest.raises(ValueError, match=r"labels.*shape|logits must be \[B, T, V\]"):
        bs_token_loss(logits, labels, shift=shift, reduction="token_mean")


def test_sequence_mean_needs_sequences():
    with pytest.raises(ValueError, match="sequence_mean"):
        bs_token_loss(torch.randn(10, 11), torch.randint(0, 11, (10,)), shift=False)


def test_explicit_unavailable_impl_says_why():
    """An impl that cannot run here raises with its reason rather than silently falling back."""
    import bs_kernels

    for name in ("native", "triton"):
        reason = bs_kernels.unavailable_reason(name, torch.device("cpu"))
        if reason is None:
            continue
        with pytest.raises(RuntimeError) as info:
            bs_token_loss(LOGITS, LABELS, impl=name)
        assert str(info.value) == reason
