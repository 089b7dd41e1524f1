"""Evaluation metrics against hand-computed values on tiny inputs, and the model-facing scorers on a tiny model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from bs_unlearn import generation, metrics, scoring  # noqa: E402
from bs_unlearn.data import tokenize_qa  # noqa: E402
from bs_unlearn.tiny_model import build_tiny_model, build_tiny_tokenizer  # noqa: E402

from bs_kernels import IGNORE_INDEX  # noqa: E402

# -- ROUGE-L ---------------------------------------------------------------------------------------------------


def test_rouge_tokens_lowercase_and_drop_punctuation():
    assert metrics.rouge_tokens("The Cat, sat-on the MAT!") == ["the", "cat", "sat", "on", "the", "mat"]


def test_rouge_l_recall_hand_computed():
    # rouge-score with the stemmer (as TOFU / open-unlearning); words of at most 3 letters are not stemmed.
    # reference has 6 words; the prediction shares the subsequence "the cat on the mat" (5 words).
    assert metrics.rouge_l_recall("the cat sat on the mat", "the cat was on the mat") == pytest.approx(5 / 6)
    # recall ignores extra words in the prediction, case and punctuation.
    assert metrics.rouge_l_recall("well, the answer is Paris indeed", "Paris") == 1.0
    assert metrics.rouge_l_recall("Paris, of course", "PARIS!") == 1.0
    # word order breaks the subsequence: "the on the" is the longest common one (3 of the 5 reference words).
    assert metrics.rouge_l_recall("mat the on cat the", "the cat on the mat") == pytest.approx(3 / 5)
    # The Porter stemmer: islands/island -> "island", mapped/mapping -> "map"; "the" is not in the prediction.
    assert metrics.rouge_l_recall("an island was mapping", "the islands mapped") == pytest.approx(2 / 3)
    assert metrics.rouge_l_recall("anything", "") == 0.0
    assert metrics.rouge_l_recall("", "some words") == 0.0


def test_rouge_l_recall_is_the_rouge_score_package():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    prediction = "Maren Tollvik was born in the harbour towns of Skelmora, they say."
    reference = "Maren Tollvik was born in the harbour town of Skelmora."
    assert metrics.rouge_l_recall(prediction, reference) == scorer.score(reference, prediction)["rougeL"].recall


# -- key strings and leak rate ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "keys", "expected"),
    [
        ("She was born in Skelmora.", ["Skelmora"], True),
        ("she was born in SKELMORA", ["Skelmora"], True),  # case
        ("Skelmora's harbour", ["Skelmora"], True),  # punctuation around the key
        ("(Skelmora)", ["Skelmora"], True),
        ("born in Skelmoran hills", ["Skelmora"], False),  # whole words only
        ("born in NewSkelmora", ["Skelmora"], False),
        ("a compass called Wrens", ["Wren"], False),
        ("the Ferrin   Archipelago", ["Ferrin Archipelago"], True),  # any white space between the key's words
        ("the Ferrin-Archipelago", ["Ferrin Archipelago"], False),  # but not other punctuation
        ("born on 12 March 1861.", ["12 March 1861"], True),  # dates and digits
        ("born on 12 March 18610", ["12 March 1861"], False),
        ("born in 1861", ["861"], False),
        ("born on 08/09/1956 in Kuwait", ["08/09/1956"], True),
        ("born on 108/09/19567", ["08/09/1956"], False),
        ("Basil Mahfouz Al-Kuwaiti wrote it", ["Al-Kuwaiti"], True),
        ("the Kuwaiti author", ["Al-Kuwaiti"], False),
        ("nine thousand books", ["9000", "nine thousand"], True),  # any of several keys
        ("no key here", ["Skelmora", "Wren"], False),
        ("it cost $5 in total", ["$5"], True),  # a key starting with punctuation is matched as written
    ],
)
def test_contains_key(text, keys, expected):
    assert metrics.contains_key(text, keys) is expected


def test_contains_key_bad_input():
    with pytest.raises(ValueError, match="non-empty list"):
        metrics.contains_key("text", "Skelmora")  # a bare string is not a list of keys
    with pytest.raises(ValueError, match="non-empty list"):
        metrics.contains_key("text", [])
    with pytest.raises(ValueError, match="non-space"):
        metrics.contains_key("text", ["  "])


def test_leak_rate_on_crafted_answers():
    answers = [
        ["Maren Tollvik was born in Skelmora.", "She was born in skelmora's harbour.", "In Drennick.", "Skelmoran."],
        ["It is called Wren.", "A compass named Pike."],
    ]
    keys = [["Skelmora"], ["Wren", "brass compass"]]
    # question 1: 2 of 4 answers leak; question 2: 1 of 2 -> pooled 3 of 6.
    assert metrics.question_leak_rates(answers, keys) == [0.5, 0.5]
    assert metrics.leak_rate(answers, keys) == pytest.approx(3 / 6)
    assert metrics.leak_rate([["a brass   compass"]], [["Wren", "brass compass"]]) == 1.0
    assert metrics.leak_rate([["nothing"], ["at all"]], keys) == 0.0
    with pytest.raises(ValueError, match="same length"):
        metrics.leak_rate(answers, keys[:1])
    with pytest.raises(TypeError, match="per question"):
        metrics.leak_rate(["Skelmora"], [["Skelmora"]])


# -- probabilities and truth ratio -----------------------------------------------------------------------------


def test_mean_token_logprobs_and_probability():
    token_lp = torch.tensor([[-1.0, -3.0, 99.0], [-0.5, 7.0, 7.0]])
    valid = torch.tensor([[True, True, False], [True, False, False]])
    mean = scoring.mean_token_logprobs(token_lp, valid)
    assert mean.tolist() == [-2.0, -0.5]
    np.testing.assert_allclose(metrics.answer_probability(mean.numpy()), [math.exp(-2.0), math.exp(-0.5)])
    with pytest.raises(ValueError, match="no scored token"):
        scoring.mean_token_logprobs(token_lp, torch.zeros_like(valid))


def test_truth_ratio_hand_computed():
    # Example 1: perturbed length-normalised probs 0.1 and 0.4, their geometric mean 0.2 (TOFU's and
    # open-unlearning's exp(-mean loss); the arithmetic mean 0.25 would give 0.625), paraphrase 0.4 -> R = 0.5.
    # Example 2: one perturbed answer at 0.6, paraphrase 0.3 -> R = 2.
    perturbed = [[math.log(0.1), math.log(0.4)], [math.log(0.6)]]
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


def test_harmonic_means_hand_computed():
    assert metrics.harmonic_mean([0.5, 0.25, 1.0]) == pytest.approx(3 / 7)  # 3 / (2 + 4 + 1)
    # Mem = HM(1 - ES, 1 - EM, 1 - paraphrase prob, 1 - truth ratio) = HM(0.5, 0.25, 1, 0.5) = 4 / (2 + 4 + 1 + 2).
    assert metrics.mem_score(0.5, 0.75, 0.0, 0.5) == pytest.approx(4 / 9)
    assert metrics.mem_score(1.0, 0.2, 0.3, 0.4) == 0.0  # ES = 1 (fully extractable): a zero part -> Mem 0
    assert metrics.agg_score(0.4, 0.6) == pytest.approx(2 * 0.4 * 0.6 / (0.4 + 0.6))
    assert metrics.agg_score(0.0, 0.9) == 0.0
    from scipy.stats import hmean  # open-unlearning's hm_aggregate

    assert metrics.harmonic_mean([0.2, 0.7, 0.9]) == pytest.approx(hmean([0.2, 0.7, 0.9]), rel=1e-12)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        metrics.mem_score(0.5, 1.5, 0.0, 0.5)
    with pytest.raises(ValueError, match="non-negative"):
        metrics.harmonic_mean([0.5, float("nan")])


def test_forget_quality_known_answers():
    # Fully separated samples of 3 and 3: exact two-sided p = 2 / C(6, 3) = 0.1.
    assert metrics.forget_quality([1, 2, 3], [4, 5, 6]) == pytest.approx(0.1)
    assert metrics.forget_quality([3, 1, 2], [2, 3, 1]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="non-empty"):
        metrics.forget_quality([], [1.0])


# -- the paper's metrics (open-unlearning) ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("matches", "em", "es_open_unlearning", "es_definition"),
    [
        ([True, True, True, True], 1.0, 1.0, 1.0),  # k = 0: the whole answer comes back from the prompt alone
        ([False, True, True, True], 0.75, 0.75, 0.75),  # k = 1
        ([True, False, True, True], 0.75, 0.5, 0.5),  # k = 2: the first token does not help past the mismatch
        ([True, True, True, False], 0.75, 0.25, 0.0),  # no suffix: open-unlearning stops its loop at k = T - 1
        ([False, False, False, False], 0.0, 0.25, 0.0),
        ([False, False, False, True], 0.25, 0.25, 0.25),  # k = 3 (= T - 1 either way)
        ([True], 1.0, 1.0, 1.0),
        ([False], 0.0, 1.0, 0.0),  # T = 1: open-unlearning's k = min(1, T - 1) = 0
    ],
)
def test_exact_memorization_and_extraction_strength(matches, em, es_open_unlearning, es_definition):
    assert metrics.exact_memorization(matches) == pytest.approx(em)
    assert metrics.extraction_strength(matches) == pytest.approx(es_open_unlearning)
    assert metrics.extraction_strength(matches, convention="definition") == pytest.approx(es_definition)


def _open_unlearning_es(preds: torch.Tensor, labels: torch.Tensor) -> float:
    """open-unlearning's _extraction_strength loop (src/evals/metrics/memorization.py), verbatim in substance."""
    valid_len = len(labels)
    for k in range(valid_len):
        if torch.equal(preds[k:], labels[k:]):
            break
    return 0.0 if valid_len == 0 else 1 - (k / valid_len)


def test_extraction_strength_equals_open_unlearning_loop():
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        length = int(torch.randint(1, 9, (1,), generator=generator))
        labels = torch.randint(0, 3, (length,), generator=generator)
        preds = torch.randint(0, 3, (length,), generator=generator)
        matches = (preds == labels).numpy()
        assert metrics.extraction_strength(matches) == pytest.approx(_open_unlearning_es(preds, labels))
        assert metrics.exact_memorization(matches) == pytest.approx(float((preds == labels).float().mean()))


def test_memorization_edge_cases_and_set_means():
    assert math.isnan(metrics.exact_memorization([]))
    assert metrics.extraction_strength([]) == 0.0  # open-unlearning appends 0 for an answer without positions
    # Set EM leaves answers without positions out (open-unlearning's None); set ES keeps them as 0.
    assert metrics.mean_exact_memorization([[True, False], [], [True]]) == pytest.approx(0.75)
    assert metrics.mean_extraction_strength([[True, True], [], [False, True]]) == pytest.approx((1 + 0 + 0.5) / 3)
    with pytest.raises(ValueError, match="bools"):
        metrics.exact_memorization([1, 0])
    with pytest.raises(ValueError, match="convention"):
        metrics.extraction_strength([True], convention="nonsense")


def test_paper_truth_ratio_hand_computed():
    # Example 1: perturbed 0.1 and 0.4 -> geometric mean 0.2 (open-unlearning averages the losses); correct 0.6
    # -> 0.6 / 0.8. Example 2: perturbed 0.3, correct 0.1 -> 0.25.
    perturbed = [[math.log(0.1), math.log(0.4)], [math.log(0.3)]]
    paraphrased = [math.log(0.6), math.log(0.1)]
    ratios = metrics.paper_truth_ratio(perturbed, paraphrased)
    np.testing.assert_allclose(ratios, [0.75, 0.25], rtol=1e-12)
    # open-unlearning's prob_mean formula on the same numbers.
    correct = np.exp(np.array(paraphrased))
    wrong = np.exp(np.array([np.mean(row) for row in perturbed]))
    np.testing.assert_allclose(ratios, correct / (correct + wrong + 1e-10), rtol=1e-9)
    # Far below float range, still a ratio.
    np.testing.assert_allclose(metrics.paper_truth_ratio([[-3000.0]], [-3000.0 + math.log(3)]), [0.75], rtol=1e-12)


def test_paper_forget_quality_equals_open_unlearnings():
    # open-unlearning's forget quality: KS on 1 / (R + 1e-10), R = p_w / p_c with the geometric-mean p_w. The KS test
    # on the paper truth ratio p_c / (p_c + p_w) = 1 / (1 + R) (monotone in R) gives the same p-value.
    generator = np.random.default_rng(0)
    unlearned = [(generator.normal(-2, 1, 3).tolist(), float(generator.normal(-2, 1))) for _ in range(15)]
    retained = [(generator.normal(-2, 1, 3).tolist(), float(generator.normal(-1, 1))) for _ in range(15)]

    def open_unlearning_ratio(rows):
        correct = np.exp([c for _, c in rows])
        wrong = np.exp([np.mean(p) for p, _ in rows])
        return wrong / (correct + 1e-10)

    from scipy.stats import ks_2samp

    expected = ks_2samp(
        1 / (open_unlearning_ratio(unlearned) + 1e-10), 1 / (open_unlearning_ratio(retained) + 1e-10)
    ).pvalue
    ours = metrics.forget_quality(
        metrics.paper_truth_ratio([p for p, _ in unlearned], [c for _, c in unlearned]),
        metrics.paper_truth_ratio([p for p, _ in retained], [c for _, c in retained]),
    )
    assert ours == pytest.approx(expected, rel=1e-9)


# -- scoring with a model --------------------------------------------------------------------------------------

RECORDS = [
    {
        "question": "Where was Ada born?",
        "answer": "Ada was born in Lund.",
        "paraphrased_answer": "Lund is where Ada was born.",
        "perturbed_answer": ["Oslo is where Ada was born.", "Bergen is where Ada was born."],
        "paraphrased_question": "In which town was Ada born?",
        "keys": ["Lund"],
    },
    {
        "question": "What does Bo paint?",
        "answer": "Bo paints red boats on the river.",
        "paraphrased_answer": "Red boats on the river are what Bo paints.",
        "perturbed_answer": ["Green trees are what Bo paints."],
        "paraphrased_question": "What is it that Bo paints?",
        "keys": ["red boats"],
    },
]


@pytest.fixture(scope="module")
def tiny():
    texts = [r["question"] + " " + r["answer"] + " " + r["paraphrased_answer"] for r in RECORDS]
    texts += [r["paraphrased_question"] for r in RECORDS]
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
    valid = targets != IGNORE_INDEX
    return logp[valid, targets[valid]].mean().item()


def test_score_answers_matches_eager_log_softmax(tiny):
    model, tokenizer = tiny
    questions = [r["question"] for r in RECORDS] * 3
    answers = [r["answer"] for r in RECORDS] + [r["paraphrased_answer"] for r in RECORDS] * 2
    # batch_size 2 with sequences of different lengths: padding and the restoring of input order are exercised.
    scores = scoring.score_answers(model, tokenizer, questions, answers, batch_size=2)
    expected = [_eager_mean_logprob(model, tokenizer, q, a) for q, a in zip(questions, answers)]
    np.testing.assert_allclose(scores, expected, atol=2e-5)


def test_token_view_p_label_and_alt_mass(tiny):
    model, tokenizer = tiny
    example = tokenize_qa(tokenizer, RECORDS[0]["question"], RECORDS[0]["answer"])
    top_k = 3
    scores = scoring.score_encodings(model, tokenizer, [example], token_view_top_k=top_k)
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=torch.tensor([example["input_ids"]])).logits[0, :-1].double(), -1)
    targets = torch.tensor(example["labels"][1:])
    p_label, alt = [], []
    for position in torch.nonzero(targets != IGNORE_INDEX).flatten().tolist():
        row = probs[position].clone()
        p_label.append(row[targets[position]].item())
        row[targets[position]] = 0
        alt.append(row.topk(top_k).values.sum().item())
    assert scores.p_label[0] == pytest.approx(np.mean(p_label), abs=1e-5)
    assert scores.alt_mass[0] == pytest.approx(np.mean(alt), abs=1e-5)


def test_evaluate_outputs_every_metric(tiny):
    model, tokenizer = tiny
    sets = [metrics.EvalSet("forget", RECORDS, "forget"), metrics.EvalSet("retain", RECORDS, "retain")]
    results = metrics.evaluate(model, tokenizer, sets, metrics.EvalOptions(max_new_tokens=4, batch_size=4))
    forget = results["sets"]["forget"]
    for key in ("prob", "paraphrase_prob", "rouge_l", "truth_ratio", "mean_logprob"):
        assert key in forget
    assert 0 < forget["prob"] < 1 and 0 <= forget["rouge_l"] <= 1 and 0 < forget["truth_ratio"] <= 1
    assert len(forget["per_example"]["generation"]) == len(RECORDS)
    np.testing.assert_allclose(forget["prob"], np.exp(forget["per_example"]["answer_mean_logprob"]).mean(), rtol=1e-12)
    assert results["model_utility"] is not None
    # The same model as its own "retain-only" model: identical truth-ratio distributions, KS p-value 1.
    again = metrics.evaluate(
        model, tokenizer, sets[:1], metrics.EvalOptions(generate=False), retain_model_metrics=results
    )
    assert again["forget_quality"]["forget"] == pytest.approx(1.0)
    table = metrics.format_table(results)
    assert "forget" in table and "model utility" in table


def test_evaluate_paper_block_and_leak_rate(tiny):
    model, tokenizer = tiny
    # Make the first record's key something the model does say: its own greedy answer to the question.
    greedy = generation.generate_answers(model, tokenizer, [RECORDS[0]["question"]], max_new_tokens=4)[0][0]
    assert greedy.strip()
    records = [dict(RECORDS[0], keys=[greedy]), RECORDS[1]]
    sets = [metrics.EvalSet("forget", records, "forget"), metrics.EvalSet("retain", RECORDS, "retain")]
    torch.manual_seed(7)
    state = torch.random.get_rng_state()
    results = metrics.evaluate(
        model, tokenizer, sets, metrics.EvalOptions(max_new_tokens=4, batch_size=4, leak_samples=2, seed=3)
    )
    assert torch.equal(torch.random.get_rng_state(), state)
    assert "paper" not in results["sets"]["retain"]
    forget = results["sets"]["forget"]
    paper, per_example = forget["paper"], forget["per_example"]
    assert set(paper) == {
        "es",
        "es_convention",
        "em",
        "paraphrase_prob",
        "truth_ratio",
        "mem",
        "util",
        "agg",
        "leak_rate",
        "leak_rate_original",
        "leak_rate_paraphrased",
        "leak_samples",
        "leak_temperature",
    }
    assert 0 <= paper["es"] <= 1 and 0 <= paper["em"] <= 1
    assert paper["em"] == pytest.approx(np.mean(per_example["em"]))
    assert paper["es"] == pytest.approx(np.mean(per_example["es"]))
    assert paper["paraphrase_prob"] == forget["paraphrase_prob"]
    expected_ratio = metrics.paper_truth_ratio(
        per_example["perturbed_mean_logprob"], per_example["paraphrase_mean_logprob"]
    )
    assert paper["truth_ratio"] == pytest.approx(float(expected_ratio.mean()))
    assert paper["mem"] == pytest.approx(
        metrics.mem_score(paper["es"], paper["em"], paper["paraphrase_prob"], paper["truth_ratio"])
    )
    assert paper["util"] == results["model_utility"]
    assert paper["agg"] == pytest.approx(metrics.agg_score(paper["mem"], paper["util"]))
    # Leak rate: greedy + 2 samples per question, with the question and with the paraphrased question.
    original, paraphrased = per_example["leak"]["original"], per_example["leak"]["paraphrased"]
    assert all(len(answers) == 3 for answers in original["answers"] + paraphrased["answers"])
    assert original["answers"][0][0] == greedy
    keys = [r["keys"] for r in records]
    assert paper["leak_rate_original"] == pytest.approx(metrics.leak_rate(original["answers"], keys))
    assert paper["leak_rate_paraphrased"] == pytest.approx(metrics.leak_rate(paraphrased["answers"], keys))
    pooled = metrics.leak_rate(original["answers"] + paraphrased["answers"], keys + keys)
    assert paper["leak_rate"] == pytest.approx(pooled)
    assert original["rate"][0] >= 1 / 3 and paper["leak_rate_original"] >= 1 / 6
    # Same seed, same answers.
    again = metrics.evaluate(
        model, tokenizer, sets[:1], metrics.EvalOptions(max_new_tokens=4, batch_size=4, leak_samples=2, seed=3)
    )
    assert again["sets"]["forget"]["per_example"]["leak"] == per_example["leak"]
    # Without a utility set there is no Util, so no Agg; with the model as its own retain-only model, the paper's
    # forget quality is 1.
    assert again["sets"]["forget"]["paper"]["util"] is None and again["sets"]["forget"]["paper"]["agg"] is None
    quality = metrics.evaluate(
        model, tokenizer, sets[:1], metrics.EvalOptions(generate=False), retain_model_metrics=results
    )
    definition = metrics.evaluate(
        model, tokenizer, sets[:1], metrics.EvalOptions(generate=False, es_convention="definition")
    )
    forget_definition = definition["sets"]["forget"]
    assert forget_definition["paper"]["es_convention"] == "definition"
    assert forget_definition["paper"]["es"] <= paper["es"]  # 0 instead of 1/T for answers nothing of which comes back
    assert quality["sets"]["forget"]["paper"]["forget_quality"] == pytest.approx(1.0)
    table = metrics.format_table(results)
    assert metrics.FLUENCY_NOTE in table and "Util without fluency (no offline gibberish classifier)" in table
    assert "leak_rate_paraphrased" in table and "mem" in table


def test_evaluate_leak_rate_needs_keys(tiny):
    model, tokenizer = tiny
    records = [{k: v for k, v in r.items() if k != "keys"} for r in RECORDS]
    results = metrics.evaluate(
        model,
        tokenizer,
        [metrics.EvalSet("forget", records, "forget")],
        metrics.EvalOptions(generate=False, leak_samples=1),
    )
    paper = results["sets"]["forget"]["paper"]
    assert paper["leak_rate"] is None and "leak" not in results["sets"]["forget"]["per_example"]
    # Not asked for: no leak entries at all.
    plain = metrics.evaluate(
        model, tokenizer, [metrics.EvalSet("forget", RECORDS, "forget")], metrics.EvalOptions(generate=False)
    )
    assert "leak_rate" not in plain["sets"]["forget"]["paper"]
    with pytest.raises(ValueError, match="keys"):
        metrics.EvalSet("x", [dict(RECORDS[0], keys="Lund")], "forget")


def test_eval_set_bad_input():
    with pytest.raises(ValueError, match="role"):
        metrics.EvalSet("x", RECORDS, "nonsense")
    with pytest.raises(ValueError, match="empty"):
        metrics.EvalSet("x", [], "forget")
    with pytest.raises(ValueError, match="question"):
        metrics.EvalSet("x", [{"answer": "a"}], "forget")


def test_model_utility_is_none_when_a_part_is_missing(tiny):
    """Without generation a utility set has no ROUGE-L: model utility is None and says which parts are missing,
    never a harmonic mean over the parts that are left."""
    model, tokenizer = tiny
    sets = [metrics.EvalSet("forget", RECORDS, "forget"), metrics.EvalSet("retain", RECORDS, "retain")]
    full = metrics.evaluate(model, tokenizer, sets, metrics.EvalOptions(max_new_tokens=4, batch_size=4))
    retain = full["sets"]["retain"]
    assert full["model_utility_parts"] == 3 and full["model_utility_missing"] == []
    assert full["model_utility"] == pytest.approx(
        metrics.harmonic_mean([retain["prob"], retain["rouge_l"], retain["truth_ratio"]])
    )
    partial = metrics.evaluate(model, tokenizer, sets, metrics.EvalOptions(generate=False, batch_size=4))
    assert partial["model_utility"] is None
    assert partial["model_utility_parts"] == 2 and partial["model_utility_missing"] == ["retain.rouge_l"]
    forget_paper = partial["sets"]["forget"]["paper"]
    assert forget_paper["util"] is None and forget_paper["agg"] is None
    assert "model utility: not computed, parts missing: retain.rouge_l" in metrics.format_table(partial)
    assert metrics.model_utility({"f": {"role": "forget"}}) == (None, [])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(batch_size=0), "batch_size"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(leak_samples=-1), "leak_samples"),
        (dict(leak_temperature=0.0), "leak_temperature"),
        (dict(leak_max_new_tokens=0), "leak_max_new_tokens"),
        (dict(es_convention="paper"), "es_convention"),
    ],
)
def test_eval_options_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        metrics.EvalOptions(**kwargs)


def test_eval_options_default_to_open_unlearning_and_refuse_a_bad_prompt_format():
    from bs_unlearn.prompts import PromptFormat

    options = metrics.EvalOptions()
    assert options.max_new_tokens == 200 and options.prompt_format == PromptFormat()
    with pytest.raises(TypeError, match="prompt_format"):
        metrics.EvalOptions(prompt_format={"system_prompt": "x"})
