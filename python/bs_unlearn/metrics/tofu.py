"""TOFU's metrics (docs/math.md, "Evaluation metrics"): answer probability, ROUGE-L recall, truth ratios,
option-normalised probability and model utility, as pure functions on numbers and strings.

- Answer probability = exp(mean per-token log p(answer | question)), i.e. p^(1/len).
- ROUGE-L recall of the greedy answer against the gold answer with the ``rouge-score`` package,
  ``RougeScorer(["rouge1", "rougeL"], use_stemmer=True)``, as TOFU and open-unlearning compute it.
- Truth ratio R = (prod_j p(perturbed_j)^(1/len_j))^(1/m) / p(paraphrased)^(1/len): the geometric mean over the m
  perturbed answers of their length-normalised probabilities, i.e. exp of minus the mean of their per-token losses,
  as the TOFU and open-unlearning code compute it (the TOFU paper writes an arithmetic mean, which no published number
  uses). Reported as mean(min(R, 1/R)) on forget sets and mean(max(0, 1 - R)) on the others, as TOFU does.
- Real-authors / world-facts probability = p(answer)^(1/len) / (p(answer)^(1/len) + sum_j p(option_j)^(1/len_j)).
- Model utility = harmonic mean of probability, ROUGE-L and truth score on each utility set; all of them or none.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping, Sequence

import numpy as np

# The three parts each utility set (role retain or options) gives model utility.
UTILITY_PARTS = ("prob", "rouge_l", "truth_ratio")

_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """Lower-case alphanumeric words: the rouge-score package's tokenisation without its stemmer (used to compare
    texts up to case and punctuation, e.g. the squeezing probe's deduplication)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return _NON_ALNUM.sub(" ", text.lower()).split()


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)


def rouge_l_recall(prediction: str, reference: str) -> float:
    """ROUGE-L recall of ``prediction`` against ``reference`` as TOFU / open-unlearning compute it: the
    ``rouge-score`` package with the Porter stemmer (words of more than 3 letters stemmed, lower-cased, punctuation
    dropped), LCS / number of reference tokens; 0 for an empty reference or prediction."""
    if not isinstance(prediction, str) or not isinstance(reference, str):
        raise TypeError("prediction and reference must be str")
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].recall)


def answer_probability(mean_logprobs: np.ndarray | Sequence[float]) -> np.ndarray:
    """exp(mean per-token log p): the length-normalised probability p^(1/len)."""
    return np.exp(np.asarray(mean_logprobs, dtype=np.float64))


def per_example_rows(values: Sequence[Sequence[float]], name: str) -> list[np.ndarray]:
    """Per example, its values as a float64 array (rows may differ in length; none may be empty)."""
    rows = [np.asarray(row, dtype=np.float64) for row in values]
    if any(row.ndim != 1 or row.size == 0 for row in rows):
        raise ValueError(f"{name} must be a non-empty list of values per example")
    return rows


def truth_ratio(
    perturbed_mean_logprobs: Sequence[Sequence[float]], paraphrased_mean_logprobs: Sequence[float]
) -> np.ndarray:
    """Raw truth ratio per example, R = exp(mean_j log p(perturbed_j)^(1/len_j)) / p(paraphrased)^(1/len): the
    geometric mean of the perturbed answers' length-normalised probabilities over the reference's (open-unlearning's
    ``truth_ratio``: exp(-mean of the perturbed answers' mean losses) / exp(-the reference's mean loss)).

    Args:
        perturbed_mean_logprobs: per example, the mean per-token log-prob of each perturbed answer (lists may differ
            in length).
        paraphrased_mean_logprobs: [N] mean per-token log-prob of the paraphrased (or gold) answer.
    Returns: [N]. R < 1: the model prefers the correct answer; R near 1: it cannot tell them apart.
    """
    rows = per_example_rows(perturbed_mean_logprobs, "perturbed_mean_logprobs")
    paraphrased = np.asarray(paraphrased_mean_logprobs, dtype=np.float64)
    if paraphrased.shape != (len(rows),):
        raise ValueError(
            f"paraphrased_mean_logprobs must have one value per example ({len(rows)}), got shape {paraphrased.shape}"
        )
    return np.exp(np.array([row.mean() for row in rows]) - paraphrased)


def forget_truth_score(ratios: np.ndarray) -> float:
    """TOFU's forget-set truth statistic: mean of min(R, 1/R) (1 = the model cannot tell true from false)."""
    ratios = np.asarray(ratios, dtype=np.float64)
    return float(np.mean(np.minimum(ratios, 1.0 / ratios)))


def utility_truth_score(ratios: np.ndarray) -> float:
    """TOFU's retain / utility truth statistic: mean of max(0, 1 - R) (1 = the model always prefers the truth)."""
    ratios = np.asarray(ratios, dtype=np.float64)
    return float(np.mean(np.maximum(0.0, 1.0 - ratios)))


def option_normalized_probability(
    answer_mean_logprobs: Sequence[float], perturbed_mean_logprobs: Sequence[Sequence[float]]
) -> np.ndarray:
    """p(answer)^(1/len) / (p(answer)^(1/len) + sum_j p(option_j)^(1/len_j)) per example ([N])."""
    rows = per_example_rows(perturbed_mean_logprobs, "perturbed_mean_logprobs")
    answer = np.asarray(answer_mean_logprobs, dtype=np.float64)
    if answer.shape != (len(rows),):
        raise ValueError(f"answer_mean_logprobs must have one value per example ({len(rows)}), got {answer.shape}")
    # Softmax of the answer against its options, in log space.
    return np.array([math.exp(a - np.logaddexp.reduce(np.concatenate([[a], row]))) for a, row in zip(answer, rows)])


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean (0 if any value is 0; values must be >= 0). open-unlearning's ``hm_aggregate`` is
    ``scipy.stats.hmean``, which gives the same (0 when a value is 0)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0 or bool((values < 0).any()) or bool(np.isnan(values).any()):
        raise ValueError(f"harmonic_mean needs non-negative values, got {values.tolist()}")
    if bool((values == 0).any()):
        return 0.0
    return float(values.size / np.sum(1.0 / values))


def model_utility(sets: Mapping[str, dict]) -> tuple[float | None, list[str]]:
    """TOFU's model utility from the summary metrics of evaluated sets: the harmonic mean of :data:`UTILITY_PARTS`
    of every set whose role is not forget. Returns (utility, the missing parts as ``"set.part"``): a set evaluated
    without one of its parts (no generation gives no ``rouge_l``, no perturbed answers no ``truth_ratio``) makes the
    utility None rather than a mean over fewer parts; no utility set at all gives (None, [])."""
    parts, missing = [], []
    for name, metrics in sets.items():
        if metrics["role"] == "forget":
            continue
        for key in UTILITY_PARTS:
            if key in metrics:
                parts.append(metrics[key])
            else:
                missing.append(f"{name}.{key}")
    if missing or not parts:
        return None, missing
    return harmonic_mean(parts), missing
