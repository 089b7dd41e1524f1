"""Evaluation metrics against hand-computed values on tiny inputs, and the model-facing scorers on a tiny model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from bs_unlearn import metrics  # noqa: E402
from bs_unlearn.data import tokenize_qa  # noqa: E402
from bs_unlearn.tiny_model import build_tiny_model, build_tiny_tokenizer  # noqa: E402

# -- ROUGE-L ---------------------------------------------------------------------------------------------------


def test_rouge_tokens_lowercase_and_drop_punctuation():
    assert metrics.rouge_tokens("The Cat, sat-on the MAT!") == ["the", "cat", "sat", "on", "the", "mat"]


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        ("abcbdab", "bdcaba", 4),  # the textbook example (e.g. "bcba")
        ("abc", "abc", 3),
        ("abc", "xyz", 0),
        ("", "abc", 0),
        ("aaaa", "aa", 2),
    ],
)
def test_lcs_length(first, second, expected):
    assert metrics.lcs_length(list(first), list(second)) == expected


def test_rouge_l_recall_hand_computed():
    # reference has 6 words; the prediction shares the subsequence "the cat on the mat" (5 words).
    assert metrics.rouge_l_recall("the cat sat on the mat", "the cat was on the mat") == pytest.approx(5 / 6)
    # recall ignores extra words in the prediction and word order breaks the subsequence.
    assert metrics.rouge_l_recall("well, the answer is Paris indeed", "Paris") == 1.0
    # "the on the" is the longest common subsequence of these two orderings (3 of the 5 reference words).
    assert metrics.rouge_l_recall("mat the on cat the", "the cat on the mat") == pytest.approx(3 / 5)
    assert metrics.rouge_l_recall("anything", "") == 0.0
    assert metrics.rouge_l_recall("", "some words") == 0.0


# -- probabilities and truth ratio -----------------------------------------------------------------------------


def test_mean_token_logprobs_and_probability():
    token_lp = torch.tensor([[-1.0, -3.0, 99.0], [-0.5, 7.0, 7.0]])
    valid = torch.tensor([[True, True, False], [True, False, False]])
    mean = metrics.mean_token_logprobs(token_lp, valid)
    assert mean.tolist() == [-2.0, -0.5]
    np.testing.assert_allclose(metrics.answer_probability(mean.numpy()), [math.exp(-2.0), math.exp(-0.5)])
    with pytest.raises(ValueError, match="no scored token"):
        metrics.mean_token_logprobs(token_lp, torch.zeros_like(valid))


def test_truth_ratio_hand_computed():
    # Example 1: perturbed length-normalised probs 0.1 and 0.3 (mean 0.2), paraphrase 0.4 -> R = 0.5.
    # Example 2: one perturbed answer at 0.6, paraphrase 0.3 -> R = 2.
    perturbed = [[math.log(0.1), math.log(0.3)], [math.log(0.6)]]
    paraphrased = [math.log(0.4), math.log(0.3)]
    ratios = metrics.truth_ratio(perturbed, paraphrased)
    np.testing.assert_allclose(ratios, [0.5, 2.0], rtol=1e-12)
    # Forget statistic: mean(min(R, 1/R)) = mean(0.5, 0.5); utility: mean(max(0, 1 - R)) = mean(0.5, 0).
    assert metrics.forget_truth_score(ratios) == pytest.approx(0.5)
    assert metrics.utility_truth_score(ratios) == pytest.approx(0.25)


def test_truth_ratio_does_not_underflow():
    ratios = metrics.truth_ratio([[-2000.0, -2000.0]], [-2001.0])
    np.testing.assert_allclose(ratios, [math.e], rtol=1e-12)


def test_truth_ratio_bad_input():
    with pytest.raises(ValueError, match="paraphrased_mean_logprobs"):
        metrics.truth_ratio([[-1.0], [-2.0]], [-1.0])
    with pytest.raises(ValueError, match="perturbed_mean_logprobs"):
        metrics.truth_ratio([[]], [-1.0])


def test_option_normalized_probability_hand_computed():
    # answer 0.6, options 0.2 and 0.2 -> 0.6 / 1.0; answer 0.1, option 0.3 -> 0.25
    answer = [math.log(0.6), math.log(0.1)]
    options = [[math.log(0.2), math.log(0.2)], [math.log(0.3)]]
    np.testing.assert_allclose(metrics.option_normalized_probability(answer, options), [0.6, 0.25], rtol=1e-12)


def test_harmonic_mean_and_forget_quality():
    assert metrics.harmonic_mean([1.0, 0.5]) == pytest.approx(2 / 3)
    assert metrics.harmonic_mean([0.3, 0.0]) == 0.0
    with pytest.raises(ValueError, match="non-negative"):
        metrics.harmonic_mean([-1.0])
    same = metrics.forget_quality([0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4])
    apart = metrics.forget_quality([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [10, 20, 30, 40, 50, 60])
    assert same == pytest.approx(1.0)
    # KS exact p-value for two fully separated samples of 6: 2 / C(12, 6) = 2 / 924.
    assert apart == pytest.approx(2 / 924)


# -- scoring with a model --------------------------------------------------------------------------------------

RECORDS = [
    {
        "question": "Where was Ada born?",
        "answer": "Ada was born in Lund.",
        "paraphrased_answer": "Lund is where Ada was born.",
        "perturbed_answer": ["Oslo is where Ada was born.", "Bergen is where Ada was born."],
    },
    {
        "question": "What does Bo paint?",
        "answer": "Bo paints red boats on the river.",
        "paraphrased_answer": "Red boats on the river are what Bo paints.",
        "perturbed_answer": ["Green trees are what Bo paints."],
    },
]


@pytest.fixture(scope="module")
def tiny():
    texts = [r["question"] + " " + r["answer"] + " " + r["paraphrased_answer"] for r in RECORDS]
    texts += [p for r in RECORDS for p in r["perturbed_answer"]]
    tokenizer = build_tiny_tokenizer(texts)
    return build_tiny_model(tokenizer, hidden_size=32), tokenizer


def _eager_mean_logprob(model, tokenizer, question, answer):
    example = tokenize_qa(tokenizer, question, answer)
    ids = torch.tensor([example["input_ids"]])
    labels = torch.tensor(example["labels"])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
    targets = labels[1:]
    valid = targets != -100
    return logp[valid, targets[valid]].mean().item()


def test_score_answers_matches_eager_log_softmax(tiny):
    model, tokenizer = tiny
    questions = [r["question"] for r in RECORDS] * 3
    answers = [r["answer"] for r in RECORDS] + [r["paraphrased_answer"] for r in RECORDS] * 2
    # batch_size 2 with sequences of different lengths: padding and the restoring of input order are exercised.
    scores = metrics.score_answers(model, tokenizer, questions, answers, batch_size=2)
    expected = [_eager_mean_logprob(model, tokenizer, q, a) for q, a in zip(questions, answers)]
    np.testing.assert_allclose(scores, expected, atol=2e-5)


def test_token_view_p_label_and_alt_mass(tiny):
    model, tokenizer = tiny
    example = tokenize_qa(tokenizer, RECORDS[0]["question"], RECORDS[0]["answer"])
    top_k = 3
    scores = metrics.score_encodings(model, tokenizer, [example], token_view_top_k=top_k)
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=torch.tensor([example["input_ids"]])).logits[0, :-1].double(), -1)
    targets = torch.tensor(example["labels"][1:])
    p_label, alt = [], []
    for position in torch.nonzero(targets != -100).flatten().tolist():
        row = probs[position].clone()
        p_label.append(row[targets[position]].item())
        row[targets[position]] = 0
        alt.append(row.topk(top_k).values.sum().item())
    assert scores.p_label[0] == pytest.approx(np.mean(p_label), abs=1e-5)
    assert scores.alt_mass[0] == pytest.approx(np.mean(alt), abs=1e-5)


def test_evaluate_outputs_every_metric(tiny):
    model, tokenizer = tiny
    sets = [metrics.EvalSet("forget", RECORDS, "forget"), metrics.EvalSet("retain", RECORDS, "retain")]
    results = metrics.evaluate(model, tokenizer, sets, max_new_tokens=4, batch_size=4)
    forget = results["sets"]["forget"]
    for key in ("prob", "paraphrase_prob", "rouge_l", "truth_ratio", "mean_logprob"):
        assert key in forget
    assert 0 < forget["prob"] < 1 and 0 <= forget["rouge_l"] <= 1 and 0 < forget["truth_ratio"] <= 1
    assert len(forget["per_example"]["generation"]) == len(RECORDS)
    np.testing.assert_allclose(forget["prob"], np.exp(forget["per_example"]["answer_mean_logprob"]).mean(), rtol=1e-12)
    assert results["model_utility"] is not None
    # The same model as its own "retain-only" model: identical truth-ratio distributions, KS p-value 1.
    again = metrics.evaluate(model, tokenizer, sets[:1], retain_model_metrics=results, generate=False)
    assert again["forget_quality"]["forget"] == pytest.approx(1.0)
    table = metrics.format_table(results)
    assert "forget" in table and "model utility" in table


def test_eval_set_bad_input():
    with pytest.raises(ValueError, match="role"):
        metrics.EvalSet("x", RECORDS, "nonsense")
    with pytest.raises(ValueError, match="empty"):
        metrics.EvalSet("x", [], "forget")
    with pytest.raises(ValueError, match="question"):
        metrics.EvalSet("x", [{"answer": "a"}], "forget")
