"""Checks of the reference itself, independent of the kernels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cases import random_case

from bs_kernels import bs_token_loss, resolve_impl


def authors_trainer_forget_term(logits, labels, *, lam, top_k, detach):
    """A direct transcription of the BS-T forget loss in the authors' BST trainer (open-unlearning fork).

    Their loss is forget_loss = -bst_loss.mean() with bst_loss the per-sequence mean of -(soft_target * log_probs);
    our value L_BST is the same quantity: sequence mean of <t, log pi>, averaged over sequences.
    """
    shift_logits = logits[..., :-1, :].contiguous()
    shift_labels = labels[..., 1:].contiguous()
    top_k_logits = shift_logits.clone()
    if top_k < shift_logits.size(-1):
        topk_values, topk_indices = torch.topk(shift_logits, top_k, dim=-1)
        mask = torch.full_like(shift_logits, float("-inf"))
        mask.scatter_(-1, topk_indices, topk_values)
        top_k_logits = mask
    belief_probs = F.softmax(top_k_logits, dim=-1)
    if detach:
        belief_probs = belief_probs.detach()
    clamped = torch.clamp(shift_labels.long(), min=0, max=logits.size(-1) - 1)
    one_hot = F.one_hot(clamped, num_classes=logits.size(-1)).to(logits.dtype)
    one_hot[shift_labels == -100] = 0
    soft_target = lam * belief_probs + (1 - lam) * one_hot
    log_probs = F.log_softmax(shift_logits, dim=-1)
    per_token = -(soft_target * log_probs).sum(dim=-1)
    loss_mask = shift_labels != -100
    bst_loss = (per_token * loss_mask).sum(dim=-1) / loss_mask.sum(dim=-1)
    return -bst_loss.mean()


@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("lam,top_k", [(0.2, 20), (0.5, 3), (1.0, 7)])
def test_reference_equals_authors_formula(lam, top_k, detach):
    logits, labels = random_case(3, 11, 57, seed=3)
    labels[1, 7:] = -100  # padding at the end of one sequence
    x_ours = logits.clone().requires_grad_(True)
    x_theirs = logits.clone().requires_grad_(True)
    ours = bs_token_loss(x_ours, labels, lam=lam, top_k=top_k, detach_belief=detach, impl="reference")
    theirs = authors_trainer_forget_term(x_theirs, labels, lam=lam, top_k=top_k, detach=detach)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(x_ours.grad, x_theirs.grad)


def test_reference_value_is_a_nonpositive_cross_entropy():
    logits, labels = random_case(2, 8, 30)
    per_position = bs_token_loss(logits, labels, impl="reference", reduction="none")
    assert torch.all(per_position <= 0)


def test_reference_gradcheck():
    """Beliefs attached: the reference's autograd gradient is the derivative of its value."""
    logits, labels = random_case(2, 4, 7, scale=1.0)
    assert torch.autograd.gradcheck(
        lambda x: bs_token_loss(x, labels, impl="reference", top_k=3, detach_belief=False),
        (logits.clone().requires_grad_(True),),
    )


def test_auto_resolves_to_an_available_cpu_impl():
    assert resolve_impl("auto", torch.device("cpu")) in ("native", "torch")
