"""Every edge case of SPEC.md's list raises ValueError/TypeError naming the argument and the value."""

from __future__ import annotations

import pytest
import torch

from bs_kernels import BSTokenLoss, bs_token_loss, forget_logprobs

LOGITS = torch.randn(2, 5, 11)
LABELS = torch.randint(0, 11, (2, 5))


@pytest.mark.parametrize(
    "options,error,words",
    [
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
    ],
)
def test_bad_options(options, error, words):
    with pytest.raises(error) as info:
        bs_token_loss(LOGITS, LABELS, **options)
    for word in words:
        assert word in str(info.value)


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
