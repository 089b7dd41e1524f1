"""The paper's metrics as open-unlearning computes them (docs/math.md, "Evaluation metrics"): Exact Memorization,
Extraction Strength, the paper's truth ratio, Mem, Agg and forget quality (``src/evals/metrics/memorization.py``
and ``utility.py`` of open-unlearning).

Util is model utility alone (:func:`bs_unlearn.metrics.tofu.model_utility`): the paper's Util also has fluency, a
gibberish classifier's score that cannot be had offline, so it is left out (and the tables say so) rather than
replaced by another score.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .tofu import harmonic_mean, per_example_rows

FLUENCY_NOTE = "Util without fluency (no offline gibberish classifier)"
ES_CONVENTIONS = ("open-unlearning", "definition")


def paper_truth_ratio(
    perturbed_mean_logprobs: Sequence[Sequence[float]], paraphrased_mean_logprobs: Sequence[float]
) -> np.ndarray:
    """The truth ratio of the paper's Mem, per example: p_c / (p_c + p_w) ([N], in (0, 1); high = knows the truth).

    As open-unlearning's ``truth_ratio`` with ``aggregator="prob_mean"`` (its "extent of knowledge" form, which the
    OpenUnlearning paper's Mem uses): p_c = exp(-mean per-token loss) of the paraphrased answer, p_w = exp(-mean over
    the perturbed answers of their mean per-token loss) (a geometric mean of the length-normalised probabilities,
    as open-unlearning averages the losses before exponentiating). Its set value is the plain mean; neither of the
    other aggregators ("closer_to_1_better" = mean min(R, 1/R) on forget sets, "true_better" = mean max(0, 1 - R) on
    the others, both on R = p_w / p_c) enters Mem. Computed as sigmoid(log p_c - log p_w), without open-unlearning's
    1e-10 in the denominator. A strictly decreasing function of R = p_w / p_c, so a KS test on it gives
    open-unlearning's forget quality.
    """
    rows = per_example_rows(perturbed_mean_logprobs, "perturbed_mean_logprobs")
    paraphrased = np.asarray(paraphrased_mean_logprobs, dtype=np.float64)
    if paraphrased.shape != (len(rows),):
        raise ValueError(
            f"paraphrased_mean_logprobs must have one value per example ({len(rows)}), got shape {paraphrased.shape}"
        )
    wrong = np.array([row.mean() for row in rows])
    return 1.0 / (1.0 + np.exp(wrong - paraphrased))


def _match_array(matches: Sequence[bool] | np.ndarray) -> np.ndarray:
    array = np.asarray(matches)
    if array.ndim != 1 or (array.size and array.dtype != np.bool_):
        raise ValueError(f"matches must be a 1-D sequence of bools, got {array.dtype} of shape {array.shape}")
    return array.astype(bool)


def exact_memorization(matches: Sequence[bool] | np.ndarray) -> float:
    """Exact Memorization of one answer: the fraction of its positions whose teacher-forced argmax is the label.

    ``matches`` is ``scoring.SequenceScores.argmax_match`` for the answer (its final end-of-turn position already
    left out, as open-unlearning leaves out the eos prediction). An answer with no position gives NaN (open-unlearning
    gives None and leaves the answer out of the mean; :func:`mean_exact_memorization` does the same).
    """
    array = _match_array(matches)
    return float(array.mean()) if array.size else math.nan


def extraction_strength(matches: Sequence[bool] | np.ndarray, *, convention: str = "open-unlearning") -> float:
    """Extraction Strength of one answer of T positions: 1 - k / T, k the shortest answer prefix after which greedy
    decoding reproduces the rest of the answer exactly.

    Greedy decoding from prompt + y_<k reproduces y_k..y_T-1 iff the teacher-forced argmax equals the label at every
    position j >= k (while the greedy tokens match, greedy decoding *is* teacher forcing on the answer), so k is T
    minus the length of the trailing run of True in ``matches``; open-unlearning computes it the same way (argmax of
    one teacher-forced pass, suffix comparison), without generating.

    Args:
        matches: per position, teacher-forced argmax == label (``SequenceScores.argmax_match``).
        convention: "open-unlearning" (default): exactly open-unlearning's loop ``for k in range(T): if suffix
            matches: break``, which leaves k = T - 1 when no suffix matches, so an answer with nothing reproduced
            scores 1/T (the same as one whose last token alone is reproduced), not 0, and a one-token answer
            always scores 1. "definition": k = T when no
            non-empty suffix is reproduced (the ES definition of docs/math.md), so such an answer scores 0. An
            empty answer scores 0 under both (open-unlearning appends 0 for it).
    """
    if convention not in ("open-unlearning", "definition"):
        raise ValueError(f"convention must be 'open-unlearning' or 'definition', got {convention!r}")
    array = _match_array(matches)
    total = array.size
    if total == 0:
        return 0.0
    mismatches = np.flatnonzero(~array)
    k = 0 if mismatches.size == 0 else int(mismatches[-1]) + 1
    if convention == "open-unlearning":
        k = min(k, total - 1)
    return 1.0 - k / total


def mean_exact_memorization(matches: Sequence[Sequence[bool]]) -> float:
    """Set EM: mean of :func:`exact_memorization` over the answers that have a position (NaN if none has)."""
    values = [exact_memorization(m) for m in matches]
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def mean_extraction_strength(matches: Sequence[Sequence[bool]], *, convention: str = "open-unlearning") -> float:
    """Set ES: mean of :func:`extraction_strength` over the answers."""
    if not matches:
        raise ValueError("mean_extraction_strength needs at least one answer")
    return float(np.mean([extraction_strength(m, convention=convention) for m in matches]))


def mem_score(es: float, em: float, paraphrase_prob: float, truth_ratio: float) -> float:
    """The paper's Mem: HM(1 - ES, 1 - EM, 1 - paraphrased probability, 1 - truth ratio), with the truth ratio of
    :func:`paper_truth_ratio` (mean p_c / (p_c + p_w)). 1 = nothing left of the forget set, higher is better."""
    parts = {"es": es, "em": em, "paraphrase_prob": paraphrase_prob, "truth_ratio": truth_ratio}
    for name, value in parts.items():
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"mem_score: {name} must be in [0, 1], got {value}")
    return harmonic_mean([1.0 - float(value) for value in parts.values()])


def agg_score(mem: float, util: float) -> float:
    """The paper's Agg: HM(Mem, Util)."""
    return harmonic_mean([mem, util])


def forget_quality(unlearned_truth_ratios: Sequence[float], retain_model_truth_ratios: Sequence[float]) -> float:
    """p-value of the two-sample KS test between two models' forget-set truth ratios (high = indistinguishable)."""
    from scipy.stats import ks_2samp

    first = np.asarray(unlearned_truth_ratios, dtype=np.float64)
    second = np.asarray(retain_model_truth_ratios, dtype=np.float64)
    if first.size == 0 or second.size == 0:
        raise ValueError("forget_quality needs non-empty truth-ratio lists from both models")
    return float(ks_2samp(first, second).pvalue)
