"""reduce_token_values: the reductions of docs/math.md on hand-computed values, the empty batch, bad arguments."""

from __future__ import annotations

import pytest
import torch

import bs_kernels
from bs_kernels import reduce_token_values

# Sequence 0 has valid values 1, 2 (mean 1.5); sequence 1 has 4 (mean 4); sequence 2 has none. Invalid positions
# hold garbage (including NaN and inf) that must not leak into the value or the gradient.
VALUES = [[1.0, 2.0, float("nan")], [float("inf"), 4.0, 7.0], [5.0, -3.0, 2.0]]
VALID = [[True, True, False], [False, True, False], [False, False, False]]

EXPECTED = {
    "sequence_mean": (1.5 + 4.0) / 2,
    "token_mean": (1.0 + 2.0 + 4.0) / 3,
    "sum": 7.0,
}
# d(loss)/d(values) at the valid positions, row by row (0 elsewhere).
EXPECTED_GRAD = {
    "sequence_mean": [[0.25, 0.25, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 0.0]],
    "token_mean": [[1 / 3, 1 / 3, 0.0], [0.0, 1 / 3, 0.0], [0.0, 0.0, 0.0]],
    "sum": [[1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]],
}


@pytest.mark.parametrize("reduction", sorted(EXPECTED))
def test_hand_computed_values_and_gradients(reduction):
    values = torch.tensor(VALUES, dtype=torch.float64, requires_grad=True)
    loss = reduce_token_values(values, torch.tensor(VALID), reduction)
    assert loss.dim() == 0 and loss.dtype == torch.float64
    assert loss.item() == pytest.approx(EXPECTED[reduction])
    loss.backward()
    torch.testing.assert_close(values.grad, torch.tensor(EXPECTED_GRAD[reduction], dtype=torch.float64))


def test_none_zeroes_invalid_positions():
    values = torch.tensor(VALUES, requires_grad=True)
    out = reduce_token_values(values, torch.tensor(VALID), "none")
    expected = torch.tensor([[1.0, 2.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    torch.testing.assert_close(values.grad, torch.tensor(VALID, dtype=torch.float32))


@pytest.mark.parametrize("reduction", bs_kernels.REDUCTIONS)
def test_no_valid_position_gives_zero_with_zero_gradient(reduction):
    values = torch.tensor([[float("nan"), 3.0], [float("-inf"), 1.0]], requires_grad=True)
    out = reduce_token_values(values, torch.zeros(2, 2, dtype=torch.bool), reduction)
    assert not torch.isnan(out).any()
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.equal(values.grad, torch.zeros_like(values))


def test_is_the_reduction_bs_token_loss_applies():
    logits = torch.randn(3, 5, 11, dtype=torch.float64)
    labels = torch.randint(0, 11, (3, 5))
    labels[0, 2:] = bs_kernels.IGNORE_INDEX
    labels[2] = bs_kernels.IGNORE_INDEX
    per_position = bs_kernels.bs_token_loss(logits, labels, reduction="none", impl="reference")
    valid = labels[:, 1:] != bs_kernels.IGNORE_INDEX
    for reduction in ("sequence_mean", "token_mean", "sum"):
        expected = bs_kernels.bs_token_loss(logits, labels, reduction=reduction, impl="reference")
        torch.testing.assert_close(reduce_token_values(per_position, valid, reduction), expected)


def test_bad_arguments_raise_naming_them():
    values, valid = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="reduction"):
        reduce_token_values(values, valid, "mean")
    with pytest.raises(TypeError, match="valid"):
        reduce_token_values(values, valid.float(), "sum")
    with pytest.raises(ValueError, match="valid shape"):
        reduce_token_values(values, valid[:, :2], "sum")
