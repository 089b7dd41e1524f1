"""bs_unlearn objectives against hand-computed values on tiny batches (docs/math.md, "Objectives")."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from bs_unlearn import objectives as obj
from bs_unlearn.data import pad_examples, tokenize_qa
from driver_fixtures import build_model, build_tokenizer, qa_rows

import bs_kernels

IGNORE = -100


def _tiny_batch(seed: int = 0, batch: int = 2, length: int = 5, vocab: int = 7):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, vocab, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, vocab, (batch, length), generator=generator)
    labels[:, :2] = IGNORE  # the prompt
    labels[-1, -1] = IGNORE  # padding of the shorter answer
    return logits, labels


def _hand_logprobs(logits, labels):
    """log p(label) at shifted positions by plain log_softmax + gather (the definition)."""
    log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
    shifted = labels[:, 1:]
    gathered = log_probs.gather(-1, shifted.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return gathered * (shifted != IGNORE), shifted != IGNORE


def test_ga_and_nll_equal_hand_values():
    logits, labels = _tiny_batch()
    expected_lp, mask = _hand_logprobs(logits, labels)
    token_logprobs = bs_kernels.forget_logprobs(logits, labels, impl="torch")
    hand_ga = expected_lp.sum() / mask.sum()
    assert obj.ga_loss(token_logprobs, obj.answer_mask(labels)).item() == pytest.approx(hand_ga.item(), abs=1e-10)
    assert obj.nll_loss(token_logprobs, obj.answer_mask(labels)).item() == pytest.approx(-hand_ga.item(), abs=1e-10)


def test_bs_t_equals_hand_formula():
    logits, labels = _tiny_batch(seed=1)
    lam, k = 0.3, 3
    values = bs_kernels.bs_token_loss(logits, labels, lam=lam, top_k=k, reduction="none", impl="torch")
    mask = obj.answer_mask(labels)
    # Hand: per position (1 - lam) log p(y) + lam * sum_{v in top-k} q_v log p(v), q = softmax over the top k.
    log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
    top_values, top_ids = logits[:, :-1].topk(k, dim=-1)
    q = torch.softmax(top_values, dim=-1)
    belief_term = (q * log_probs.gather(-1, top_ids)).sum(-1)
    label_term, _ = _hand_logprobs(logits, labels)
    per_position = ((1 - lam) * label_term + lam * belief_term) * mask
    per_sequence = per_position.sum(-1) / mask.sum(-1)
    reduced = bs_kernels.reduce_token_values(values, mask, "sequence_mean")  # the objective's default reduction
    assert reduced.item() == pytest.approx(per_sequence.mean().item(), abs=1e-10)


def test_npo_equals_hand_formula():
    token_logprobs = torch.tensor([[-0.5, -1.0, 0.0], [-2.0, 0.0, 0.0]], dtype=torch.float64)
    ref_token_logprobs = torch.tensor([[-0.2, -0.4, 0.0], [-3.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    beta = 0.1
    ratios = [math.exp(-1.5) / math.exp(-0.6), math.exp(-2.0) / math.exp(-3.0)]  # p_theta(y|x) / p_ref(y|x)
    hand = sum((2 / beta) * math.log(1 + r**beta) for r in ratios) / 2
    assert obj.npo_loss(token_logprobs, ref_token_logprobs, mask, beta=beta).item() == pytest.approx(hand, rel=1e-12)
    # At theta = ref every sequence contributes (2 / beta) log 2.
    same = obj.npo_loss(token_logprobs, token_logprobs, mask, beta=beta).item()
    assert same == pytest.approx(2 / beta * math.log(2), rel=1e-12)


def test_kl_matches_dense_reference_value_and_gradient():
    logits, labels = _tiny_batch(seed=2)
    ref_logits = logits + 0.3 * torch.randn(
        logits.shape, generator=torch.Generator().manual_seed(5), dtype=logits.dtype
    )
    logits_chunked = logits.clone().requires_grad_(True)
    logits_dense = logits.clone().requires_grad_(True)
    value = obj.kl_loss(logits_chunked, ref_logits, labels, chunk=2)  # chunk < rows: several chunks
    mask = obj.answer_mask(labels)
    log_p = torch.log_softmax(logits_dense[:, :-1], dim=-1)
    log_ref = torch.log_softmax(ref_logits[:, :-1], dim=-1)
    dense = ((log_ref.exp() * (log_ref - log_p)).sum(-1) * mask).sum() / mask.sum()
    assert value.item() == pytest.approx(dense.item(), abs=1e-6)
    value.backward()
    dense.backward()
    torch.testing.assert_close(logits_chunked.grad, logits_dense.grad, atol=1e-6, rtol=1e-5)
    assert obj.kl_loss(logits, logits, labels).item() == pytest.approx(0.0, abs=1e-6)


class _FixedLogits(torch.nn.Module):
    """A stand-in model that returns preset logits per input (keyed by the first token), with a learnable shift."""

    def __init__(self, table: dict[int, torch.Tensor]) -> None:
        super().__init__()
        self.table = table
        self.bias = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask, use_cache=False):
        out = torch.stack([self.table[int(row[0])] for row in input_ids]) + self.bias
        return type("Out", (), {"logits": out})()


def _batch(labels, first_token):
    ids = labels.clamp(min=0).clone()
    ids[:, 0] = first_token
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_method_losses_combine_terms_with_weights():
    forget_logits, forget_labels = _tiny_batch(seed=3, batch=1)
    retain_logits, retain_labels = _tiny_batch(seed=4, batch=1)
    belief_logits, belief_labels = _tiny_batch(seed=5, batch=1)
    model = _FixedLogits({100: forget_logits[0], 200: retain_logits[0], 300: belief_logits[0]})
    batch = {
        "forget": _batch(forget_labels, 100),
        "retain": _batch(retain_labels, 200),
        "beliefs": _batch(belief_labels, 300),
    }
    forget_lp, forget_mask = _hand_logprobs(forget_logits, forget_labels)
    retain_lp, retain_mask = _hand_logprobs(retain_logits, retain_labels)
    belief_lp, belief_mask = _hand_logprobs(belief_logits, belief_labels)
    ga = (forget_lp.sum() / forget_mask.sum()).item()
    nll = -(retain_lp.sum() / retain_mask.sum()).item()
    ga_beliefs = (belief_lp.sum() / belief_mask.sum()).item()

    graddiff = obj.UnlearnObjective(obj.ObjectiveConfig(method="graddiff", forget_weight=2.0, retain_weight=0.5))
    loss, metrics = graddiff(model, batch)
    assert loss.item() == pytest.approx(2.0 * ga + 0.5 * nll, abs=1e-6)
    assert metrics["forget_logprob"] == pytest.approx(ga, abs=1e-6)

    bs_s = obj.UnlearnObjective(obj.ObjectiveConfig(method="bs-s", lam_s=0.25, bs_s_base="ga"))
    loss, metrics = bs_s(model, batch)
    assert loss.item() == pytest.approx(0.75 * ga + 0.25 * ga_beliefs + nll, abs=1e-6)
    assert metrics["belief_logprob"] == pytest.approx(ga_beliefs, abs=1e-6)

    pure_ga = obj.UnlearnObjective(obj.ObjectiveConfig(method="ga"))
    loss, metrics = pure_ga(model, {"forget": batch["forget"]})
    assert loss.item() == pytest.approx(ga, abs=1e-6)
    assert "retain_loss" not in metrics

    npo = obj.UnlearnObjective(obj.ObjectiveConfig(method="npo", retain_loss=None))
    loss, _ = npo(model, batch, ref_model=model)  # theta = ref: (2 / beta) log 2
    assert loss.item() == pytest.approx(2 / 0.1 * math.log(2), abs=1e-5)
    with pytest.raises(ValueError, match="reference model"):
        npo(model, batch)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="sgd"), "method"),
        (dict(retain_loss="mse"), "retain_loss"),
        (dict(bs_s_base="bs_s"), "bs_s_base"),
        (dict(lam_s=1.5), "lam_s"),
        (dict(beta=0.0), "beta"),
        (dict(lam=2.0), "lam"),
        (dict(top_k=0), "top_k"),
        (dict(forget_reduction="mean"), "forget_reduction"),
    ],
)
def test_objective_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        obj.ObjectiveConfig(**kwargs).validate()  # lam, top_k: checked by bs_kernels, in validate()


def test_method_defaults():
    assert obj.ObjectiveConfig(method="ga").retain_loss is None
    assert obj.ObjectiveConfig(method="graddiff").retain_loss == "nll"
    assert obj.ObjectiveConfig(method="npo").needs_reference
    config = obj.ObjectiveConfig(method="bs-s", bs_s_base="bs_t")
    assert config.uses_beliefs and config.forget_objective == "bs_t"
    assert (config.lam, config.top_k, config.lam_s, config.beta) == (0.2, 20, 0.5, 0.1)


@pytest.mark.parametrize("method", ["graddiff", "bs-t", "npo"])
def test_fused_linear_path_matches_logits_path(method):
    tokenizer = build_tokenizer()
    model = build_model(tokenizer).double()
    reference = copy.deepcopy(model)
    rows = qa_rows(range(4))
    examples = [tokenize_qa(tokenizer, row["question"], row["answer"]) for row in rows]
    batch = {
        "forget": pad_examples(examples[:2], tokenizer.pad_token_id),
        "retain": pad_examples(examples[2:], tokenizer.pad_token_id),
    }
    results = []
    for fused_linear in (False, True):
        model.zero_grad()
        config = obj.ObjectiveConfig(method=method, top_k=5)
        objective = obj.UnlearnObjective(config, impl="torch", fused_linear=fused_linear)
        loss, metrics = objective(model, batch, ref_model=reference)
        loss.backward()
        results.append((loss.detach(), metrics, [p.grad.clone() for p in model.parameters()]))
    (loss_a, metrics_a, grads_a), (loss_b, metrics_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, atol=1e-9, rtol=1e-9)
    assert metrics_a == pytest.approx(metrics_b, abs=1e-9)
    for grad_a, grad_b in zip(grads_a, grads_b):
        torch.testing.assert_close(grad_a, grad_b, atol=1e-9, rtol=1e-7)
