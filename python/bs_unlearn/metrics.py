"""Evaluation metrics: TOFU's (shared/SPEC.md, "Evaluation metrics") and the paper's Mem / Util / Agg as
open-unlearning computes them ("The paper's aggregate metrics"), plus the leak rate ("Leak rate").

Two layers here, on top of ``scoring`` (the model-facing scorers and generation):
- pure functions on numbers and strings (ROUGE-L, truth ratios, option-normalised probability, Exact Memorization,
  Extraction Strength, harmonic means, forget quality, key matching and leak rate), tested against hand-computed
  values;
- whole evaluations (:class:`EvalSet`, :func:`evaluate_set`, :func:`evaluate`, :func:`format_table`).

TOFU conventions followed (and where they differ from the TOFU code):
- Answer probability = exp(mean per-token log p(answer | question)), i.e. p^(1/len).
- ROUGE-L recall of the greedy answer against the gold answer with the ``rouge-score`` package,
  ``RougeScorer(["rouge1", "rougeL"], use_stemmer=True)``, as TOFU and open-unlearning compute it.
- Truth ratio R = mean_j p(perturbed_j)^(1/len_j) / p(paraphrased)^(1/len) (the TOFU paper's formula: an arithmetic
  mean of length-normalised probabilities; the TOFU and open-unlearning code take a geometric mean instead, which the
  paper block's truth ratio follows). Reported as mean(min(R, 1/R)) on forget sets and mean(max(0, 1 - R)) on the
  others, as TOFU does.
- Real-authors / world-facts probability = p(answer)^(1/len) / (p(answer)^(1/len) + sum_j p(option_j)^(1/len_j)).
- Model utility = harmonic mean of probability, ROUGE-L and truth score on each utility set.
- Forget quality = p-value of the two-sample KS test between the forget set's raw truth ratios under the unlearned
  model and under a retain-only model (KS is invariant to the monotone R -> 1/R, so either orientation gives it).

The paper's metrics (open-unlearning, ``src/evals/metrics/memorization.py`` and ``utility.py``) are in the
``paper`` block of each forget set; see :func:`evaluate` for its keys and :func:`exact_memorization`,
:func:`extraction_strength` and :func:`paper_truth_ratio` for the definitions. Util is model utility alone: the
paper's Util also has fluency, a gibberish classifier's score that cannot be had offline, so it is left out (and
the table says so) rather than replaced by another score.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .scoring import generate_answers, sample_answers, score_answers, score_qa, temperature_samples

FLUENCY_NOTE = "Util without fluency (no offline gibberish classifier)"

# --------------------------------------------------------------------------------------------------------------
# Pure functions: text
# --------------------------------------------------------------------------------------------------------------

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


@functools.lru_cache(maxsize=4096)
def _key_pattern(key: str) -> re.Pattern:
    words = key.split()
    if not words:
        raise ValueError(f"a key must contain a non-space character, got {key!r}")
    body = r"\s+".join(re.escape(word) for word in words)
    # Whole words: a key that starts (ends) with a letter or digit must not continue a word on that side ("1861"
    # does not match "18610", "Wren" not "Wrens"); a key that starts or ends with punctuation is matched as written.
    before = r"(?<!\w)" if re.match(r"\w", words[0][0]) else ""
    after = r"(?!\w)" if re.match(r"\w", words[-1][-1]) else ""
    return re.compile(before + body + after, re.IGNORECASE)


def contains_key(text: str, keys: Sequence[str]) -> bool:
    """Whether ``text`` contains one of ``keys``: case-insensitive, whole words, any run of white space in a key
    matching any run in the text ("12 March  1861" matches "12 march 1861"); punctuation inside a key must match
    as written ("Al-Kuwaiti", "08/09/1956"), punctuation around it does not matter ("Skelmora." and "Skelmora's"
    contain "Skelmora")."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if isinstance(keys, str) or not keys:
        raise ValueError(f"keys must be a non-empty list of strings, got {keys!r}")
    return any(_key_pattern(key).search(text) is not None for key in keys)


def _checked_leak_inputs(answers, keys) -> None:
    if len(answers) != len(keys):
        raise ValueError(f"answers ({len(answers)} questions) and keys ({len(keys)}) must have the same length")
    if not answers:
        raise ValueError("leak rate needs at least one question")
    for i, (texts, question_keys) in enumerate(zip(answers, keys)):
        if isinstance(texts, str) or isinstance(question_keys, str):
            raise TypeError(f"question {i}: answers and keys must be lists of strings per question, not one string")
        if not texts:
            raise ValueError(f"question {i} has no answers")


def question_leak_rates(answers: Sequence[Sequence[str]], keys: Sequence[Sequence[str]]) -> list[float]:
    """Per question, the fraction of its answers that contain one of its keys (:func:`contains_key`)."""
    _checked_leak_inputs(answers, keys)
    return [float(np.mean([contains_key(t, k) for t in texts])) for texts, k in zip(answers, keys)]


def leak_rate(answers: Sequence[Sequence[str]], keys: Sequence[Sequence[str]]) -> float:
    """The leak rate: the fraction of all answers, pooled over questions, that still contain a key of their question.

    Args:
        answers: per question, the model's answers (e.g. greedy plus samples, :func:`scoring.sample_answers`).
        keys: per question, the key strings that are the fact (the invented place, date, name).
    """
    _checked_leak_inputs(answers, keys)
    hits = [contains_key(t, k) for texts, k in zip(answers, keys) for t in texts]
    return float(np.mean(hits))


# --------------------------------------------------------------------------------------------------------------
# Pure functions: probabilities and truth ratios
# --------------------------------------------------------------------------------------------------------------


def answer_probability(mean_logprobs: np.ndarray | Sequence[float]) -> np.ndarray:
    """exp(mean per-token log p): the length-normalised probability p^(1/len)."""
    return np.exp(np.asarray(mean_logprobs, dtype=np.float64))


def _ragged(values: Sequence[Sequence[float]], name: str) -> list[np.ndarray]:
    rows = [np.asarray(row, dtype=np.float64) for row in values]
    if any(row.ndim != 1 or row.size == 0 for row in rows):
        raise ValueError(f"{name} must be a non-empty list of values per example")
    return rows


def truth_ratio(
    perturbed_mean_logprobs: Sequence[Sequence[float]], paraphrased_mean_logprobs: Sequence[float]
) -> np.ndarray:
    """Raw truth ratio per example, R = mean_j p(perturbed_j)^(1/len_j) / p(paraphrased)^(1/len).

    Args:
        perturbed_mean_logprobs: per example, the mean per-token log-prob of each perturbed answer (lists may differ
            in length).
        paraphrased_mean_logprobs: [N] mean per-token log-prob of the paraphrased (or gold) answer.
    Returns: [N]. R < 1: the model prefers the correct answer; R near 1: it cannot tell them apart.
    """
    rows = _ragged(perturbed_mean_logprobs, "perturbed_mean_logprobs")
    paraphrased = np.asarray(paraphrased_mean_logprobs, dtype=np.float64)
    if paraphrased.shape != (len(rows),):
        raise ValueError(
            f"paraphrased_mean_logprobs must have one value per example ({len(rows)}), got shape {paraphrased.shape}"
        )
    # mean_j exp(a_j) / exp(b) computed as exp(logmeanexp(a) - b) so that very negative log-probs do not underflow.
    log_mean = np.array([np.logaddexp.reduce(row) - math.log(row.size) for row in rows])
    return np.exp(log_mean - paraphrased)


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
    rows = _ragged(perturbed_mean_logprobs, "perturbed_mean_logprobs")
    paraphrased = np.asarray(paraphrased_mean_logprobs, dtype=np.float64)
    if paraphrased.shape != (len(rows),):
        raise ValueError(
            f"paraphrased_mean_logprobs must have one value per example ({len(rows)}), got shape {paraphrased.shape}"
        )
    wrong = np.array([row.mean() for row in rows])
    return 1.0 / (1.0 + np.exp(wrong - paraphrased))


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
    rows = _ragged(perturbed_mean_logprobs, "perturbed_mean_logprobs")
    answer = np.asarray(answer_mean_logprobs, dtype=np.float64)
    if answer.shape != (len(rows),):
        raise ValueError(f"answer_mean_logprobs must have one value per example ({len(rows)}), got {answer.shape}")
    # Softmax of the answer against its options, in log space.
    return np.array([math.exp(a - np.logaddexp.reduce(np.concatenate([[a], row]))) for a, row in zip(answer, rows)])


# --------------------------------------------------------------------------------------------------------------
# Pure functions: memorization (open-unlearning's exact_memorization / extraction_strength)
# --------------------------------------------------------------------------------------------------------------


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
            non-empty suffix is reproduced (the ES definition of shared/SPEC.md), so such an answer scores 0. An
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


# --------------------------------------------------------------------------------------------------------------
# Pure functions: aggregates
# --------------------------------------------------------------------------------------------------------------


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean (0 if any value is 0; values must be >= 0). open-unlearning's ``hm_aggregate`` is
    ``scipy.stats.hmean``, which gives the same (0 when a value is 0)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0 or bool((values < 0).any()) or bool(np.isnan(values).any()):
        raise ValueError(f"harmonic_mean needs non-negative values, got {values.tolist()}")
    if bool((values == 0).any()):
        return 0.0
    return float(values.size / np.sum(1.0 / values))


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


# --------------------------------------------------------------------------------------------------------------
# Whole evaluation
# --------------------------------------------------------------------------------------------------------------


@dataclass
class EvalSet:
    """One evaluation split: TOFU records (question, answer, optional paraphrased_answer / perturbed_answer /
    paraphrased_question, and ``keys``: the key strings of the fact, for the leak rate).

    role: "forget" (truth score = mean min(R, 1/R); gets the paper block), "retain" (mean max(0, 1 - R)), or
    "options" (real authors / world facts: probability normalised against the perturbed options, truth ratio
    against the gold answer).
    """

    name: str
    records: list[dict]
    role: str = "retain"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.role not in ("forget", "retain", "options"):
            raise ValueError(f"role must be 'forget', 'retain' or 'options', got {self.role!r}")
        if not self.records:
            raise ValueError(f"evaluation set {self.name!r} is empty")
        for i, record in enumerate(self.records):
            if not isinstance(record.get("question"), str) or not isinstance(record.get("answer"), str):
                raise ValueError(f"evaluation set {self.name!r}: record {i} needs string 'question' and 'answer'")
            keys = record.get("keys")
            if keys is not None and (
                isinstance(keys, str) or not keys or not all(isinstance(k, str) and k.strip() for k in keys)
            ):
                raise ValueError(f"evaluation set {self.name!r}: record {i} 'keys' must be a non-empty list of strings")


def _perturbed_lists(records: Sequence[dict]) -> list[list[str]] | None:
    lists = []
    for record in records:
        perturbed = record.get("perturbed_answer")
        if isinstance(perturbed, str):
            perturbed = [perturbed]
        if not perturbed:
            return None
        lists.append(list(perturbed))
    return lists


def _leak(
    model,
    tokenizer,
    records: Sequence[dict],
    *,
    num_samples: int,
    temperature: float,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    greedy: list[str] | None = None,
) -> tuple[dict, dict]:
    """Leak rate of a set whose records carry keys: summary values and per-example answers / rates.

    ``greedy``: the greedy answers to the original questions when they were just generated at the same length (they
    are reused instead of generated again; the samples are the same either way, seeded separately).
    """
    keys = [list(r["keys"]) for r in records]
    summary: dict = {"leak_samples": num_samples, "leak_temperature": temperature}
    per_example: dict = {}
    phrasings = [("original", [r["question"] for r in records])]
    if all(isinstance(r.get("paraphrased_question"), str) for r in records):
        phrasings.append(("paraphrased", [r["paraphrased_question"] for r in records]))
    pooled = []
    for offset, (name, questions) in enumerate(phrasings):
        sampling = dict(
            num_samples=num_samples, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed + offset,
            batch_size=batch_size,
        )  # fmt: skip
        if name == "original" and greedy is not None:
            samples = temperature_samples(model, tokenizer, questions, **sampling)
            answers = [[first, *rest] for first, rest in zip(greedy, samples)]
        else:
            answers = sample_answers(model, tokenizer, questions, **sampling)
        rates = question_leak_rates(answers, keys)
        summary[f"leak_rate_{name}"] = float(np.mean(rates))
        per_example[name] = {"answers": answers, "rate": rates}
        pooled.extend(rates)
    # Every question has 1 + num_samples answers per phrasing, so the mean of the per-question rates is the pooled
    # fraction of answers.
    summary["leak_rate"] = float(np.mean(pooled))
    return summary, per_example


def evaluate_set(
    model: torch.nn.Module,
    tokenizer,
    eval_set: EvalSet,
    *,
    batch_size: int = 16,
    max_new_tokens: int = 48,
    generate: bool = True,
    impl: str = "auto",
    progress: Callable[[str], None] | None = None,
    leak_samples: int = 0,
    leak_temperature: float = 1.0,
    leak_max_new_tokens: int | None = None,
    seed: int = 0,
    es_convention: str = "open-unlearning",
) -> dict:
    """Probability, paraphrase probability, ROUGE-L recall and truth ratio of one set; summary + per-example lists.

    A forget set also gets the per-set part of the paper block (``"paper"``: es, em, paraphrase_prob, truth_ratio,
    and the leak rate when ``leak_samples`` > 0 and every record has ``keys``); :func:`evaluate` adds mem, util,
    agg and forget quality. See :func:`evaluate` for the leak-rate arguments.
    """
    records = eval_set.records
    questions = [r["question"] for r in records]
    answers = [r["answer"] for r in records]
    forget = eval_set.role == "forget"
    say = progress or (lambda message: None)
    say(f"{eval_set.name}: scoring {len(records)} answers")
    # One pass gives the log-probs and (forget sets) the teacher-forced argmax matches of EM / ES.
    answer_scores = score_qa(
        model, tokenizer, questions, answers, batch_size=batch_size, memorization=forget, impl=impl
    )
    answer_lp = answer_scores.mean_logprob
    result: dict = {"n": len(records), "role": eval_set.role}
    per_example: dict = {"answer_mean_logprob": answer_lp.tolist()}

    has_paraphrase = all(isinstance(r.get("paraphrased_answer"), str) for r in records)
    paraphrase_lp = None
    if has_paraphrase:
        paraphrase_lp = score_answers(
            model, tokenizer, questions, [r["paraphrased_answer"] for r in records], batch_size=batch_size, impl=impl
        )
        per_example["paraphrase_mean_logprob"] = paraphrase_lp.tolist()
        result["paraphrase_prob"] = float(answer_probability(paraphrase_lp).mean())

    perturbed = _perturbed_lists(records)
    perturbed_lp = None
    if perturbed is not None:
        say(f"{eval_set.name}: scoring {sum(map(len, perturbed))} perturbed answers")
        flat_questions = [q for q, options in zip(questions, perturbed) for _ in options]
        flat_answers = [a for options in perturbed for a in options]
        flat_lp = score_answers(model, tokenizer, flat_questions, flat_answers, batch_size=batch_size, impl=impl)
        perturbed_lp, offset = [], 0
        for options in perturbed:
            perturbed_lp.append(flat_lp[offset : offset + len(options)].tolist())
            offset += len(options)
        per_example["perturbed_mean_logprob"] = perturbed_lp

    if eval_set.role == "options" and perturbed_lp is not None:
        result["prob"] = float(option_normalized_probability(answer_lp, perturbed_lp).mean())
    else:
        result["prob"] = float(answer_probability(answer_lp).mean())
    result["mean_logprob"] = float(answer_lp.mean())

    if perturbed_lp is not None:
        # TOFU compares the perturbed answers with the paraphrase where there is one, with the answer otherwise.
        reference_lp = paraphrase_lp if paraphrase_lp is not None else answer_lp
        ratios = truth_ratio(perturbed_lp, reference_lp)
        per_example["truth_ratio"] = ratios.tolist()
        score = forget_truth_score(ratios) if forget else utility_truth_score(ratios)
        result["truth_ratio"] = score

    if generate:
        say(f"{eval_set.name}: greedy generation for {len(records)} questions")
        generations = [
            texts[0]
            for texts in generate_answers(
                model, tokenizer, questions, max_new_tokens=max_new_tokens, batch_size=batch_size
            )
        ]
        rouge = [rouge_l_recall(g, a) for g, a in zip(generations, answers)]
        per_example["generation"] = generations
        per_example["rouge_l"] = rouge
        result["rouge_l"] = float(np.mean(rouge))

    if forget:
        matches = answer_scores.argmax_match
        em_values = [exact_memorization(m) for m in matches]
        per_example["em"] = [None if math.isnan(v) else v for v in em_values]
        per_example["es"] = [extraction_strength(m, convention=es_convention) for m in matches]
        em = mean_exact_memorization(matches)
        paper: dict = {
            "es": mean_extraction_strength(matches, convention=es_convention),
            "es_convention": es_convention,
            "em": None if math.isnan(em) else em,
            "paraphrase_prob": result.get("paraphrase_prob"),
            "truth_ratio": None,
        }
        if perturbed_lp is not None and paraphrase_lp is not None:
            paper_ratios = paper_truth_ratio(perturbed_lp, paraphrase_lp)
            per_example["paper_truth_ratio"] = paper_ratios.tolist()
            paper["truth_ratio"] = float(paper_ratios.mean())
        if leak_samples > 0:
            if all(r.get("keys") for r in records):
                say(f"{eval_set.name}: leak rate from greedy + {leak_samples} samples per question")
                summary, leak_per_example = _leak(
                    model,
                    tokenizer,
                    records,
                    num_samples=leak_samples,
                    temperature=leak_temperature,
                    max_new_tokens=leak_max_new_tokens or max_new_tokens,
                    batch_size=batch_size,
                    seed=seed,
                    greedy=per_example.get("generation") if not leak_max_new_tokens else None,
                )
                paper.update(summary)
                per_example["leak"] = leak_per_example
            else:
                say(f"{eval_set.name}: no leak rate (not every record has 'keys')")
                paper["leak_rate"] = None
        result["paper"] = paper
    result["per_example"] = per_example
    return result


def _paper_forget_quality(per_example: dict, retain_set: dict) -> float | None:
    other = retain_set.get("per_example", {}).get("paper_truth_ratio")
    mine = per_example.get("paper_truth_ratio")
    if other is None or mine is None:
        return None
    return forget_quality(mine, other)


def evaluate(
    model: torch.nn.Module,
    tokenizer,
    eval_sets: Sequence[EvalSet],
    *,
    retain_model_metrics: dict | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 48,
    generate: bool = True,
    impl: str = "auto",
    progress: Callable[[str], None] | None = None,
    leak_samples: int = 0,
    leak_temperature: float = 1.0,
    leak_max_new_tokens: int | None = None,
    seed: int = 0,
    es_convention: str = "open-unlearning",
) -> dict:
    """Evaluate several sets; add model utility (sets with role retain/options), forget quality and, per forget set,
    the paper's metrics.

    Args:
        retain_model_metrics: the JSON written by :func:`evaluate` for a retain-only model on the same forget set;
            enables forget quality (KS test on the forget sets' per-example truth ratios).
        leak_samples: > 0 asks for the leak rate on forget sets whose records all carry ``keys``: per question the
            greedy answer plus ``leak_samples`` samples at ``leak_temperature`` (pure sampling, seeded with
            ``seed``, the global RNG restored), asked with the question and, where every record has one, with the
            ``paraphrased_question`` (seed + 1); ``leak_max_new_tokens`` defaults to ``max_new_tokens``.
        es_convention: "open-unlearning" (its code, the default) or "definition" (shared/SPEC.md): how ES scores an
            answer of which no suffix is reproduced (1/T or 0; see :func:`extraction_strength`).
    Returns: {"sets": {name: {...}}, "model_utility": float | None, "forget_quality": {name: float} | None}. Each
        forget set's entry has a ``"paper"`` block (the paper's Table 1 metrics as open-unlearning computes them):

        - ``es``, ``em``: Extraction Strength and Exact Memorization of the forget answers (open-unlearning's
          definitions: :func:`extraction_strength`, :func:`exact_memorization`), ``es_convention``;
        - ``paraphrase_prob``: mean p(paraphrased answer)^(1/len) (None without paraphrased answers);
        - ``truth_ratio``: mean p_c / (p_c + p_w) (:func:`paper_truth_ratio`; None without perturbed answers);
        - ``mem`` = HM(1 - es, 1 - em, 1 - paraphrase_prob, 1 - truth_ratio), ``util`` = model utility,
          ``agg`` = HM(mem, util) (None where a part is missing). Fluency is left out of Util: it needs a
          gibberish classifier that cannot be had offline, and no other score stands in for it;
        - ``forget_quality`` (with ``retain_model_metrics``): open-unlearning's forget quality, the KS p-value on
          the per-example paper truth ratios (a monotone function of open-unlearning's geometric-mean truth ratio);
        - with ``leak_samples`` > 0: ``leak_rate`` (pooled over both phrasings; None when the records carry no
          keys), ``leak_rate_original``, ``leak_rate_paraphrased`` (with paraphrased questions), ``leak_samples``,
          ``leak_temperature``; the answers are in ``per_example["leak"]``.
    """
    names = [s.name for s in eval_sets]
    if len(set(names)) != len(names):
        raise ValueError(f"evaluation set names must be unique, got {names}")
    if leak_samples < 0:
        raise ValueError(f"leak_samples must be >= 0, got {leak_samples}")
    if es_convention not in ("open-unlearning", "definition"):
        raise ValueError(f"es_convention must be 'open-unlearning' or 'definition', got {es_convention!r}")
    sets = {
        s.name: evaluate_set(
            model,
            tokenizer,
            s,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            generate=generate,
            impl=impl,
            progress=progress,
            leak_samples=leak_samples,
            leak_temperature=leak_temperature,
            leak_max_new_tokens=leak_max_new_tokens,
            seed=seed,
            es_convention=es_convention,
        )
        for s in eval_sets
    }
    utility_parts = []
    for s in eval_sets:
        if s.role == "forget":
            continue
        metrics = sets[s.name]
        utility_parts.extend(metrics[key] for key in ("prob", "rouge_l", "truth_ratio") if key in metrics)
    model_utility = harmonic_mean(utility_parts) if utility_parts else None
    output: dict = {"sets": sets, "model_utility": model_utility, "forget_quality": None}
    for s in eval_sets:
        paper = sets[s.name].get("paper")
        if paper is None:
            continue
        parts = (paper["es"], paper["em"], paper["paraphrase_prob"], paper["truth_ratio"])
        paper["mem"] = mem_score(*parts) if all(p is not None for p in parts) else None
        paper["util"] = model_utility
        paper["agg"] = agg_score(paper["mem"], model_utility) if None not in (paper["mem"], model_utility) else None
    if retain_model_metrics is not None:
        quality = {}
        for s in eval_sets:
            if s.role != "forget" or "truth_ratio" not in sets[s.name]["per_example"]:
                continue
            retain_set = retain_model_metrics.get("sets", {}).get(s.name, {})
            other = retain_set.get("per_example", {}).get("truth_ratio")
            if other is None:
                raise ValueError(
                    f"the retain model's metrics have no per-example truth ratios for set {s.name!r}: evaluate the "
                    "retain-only model on the same forget set first"
                )
            quality[s.name] = forget_quality(sets[s.name]["per_example"]["truth_ratio"], other)
            paper_quality = _paper_forget_quality(sets[s.name]["per_example"], retain_set)
            if paper_quality is not None:
                sets[s.name]["paper"]["forget_quality"] = paper_quality
        output["forget_quality"] = quality
    return output


def _cell(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows)
    return lines


def format_table(results: dict) -> str:
    """A plain-text table of the summary metrics (one row per set), then the paper's metrics of the forget sets."""
    columns = ["prob", "paraphrase_prob", "rouge_l", "truth_ratio", "mean_logprob"]
    rows = []
    for name, metrics in results["sets"].items():
        rows.append([name, str(metrics["n"])] + [_cell(metrics.get(c)) for c in columns])
    lines = _table(["set", "n", *columns], rows)
    if results.get("model_utility") is not None:
        lines.append(f"model utility (harmonic mean over retain/utility sets): {results['model_utility']:.4f}")
    for name, value in (results.get("forget_quality") or {}).items():
        lines.append(f"forget quality on {name} (KS-test p-value vs the retain-only model): {value:.4g}")
    papers = {name: m["paper"] for name, m in results["sets"].items() if m.get("paper") is not None}
    if papers:
        paper_columns = ["es", "em", "paraphrase_prob", "truth_ratio", "mem", "util", "agg", "forget_quality"]
        with_leak = any("leak_rate" in p for p in papers.values())
        leak_columns = ["leak_rate", "leak_rate_original", "leak_rate_paraphrased"] if with_leak else []
        paper_rows = [
            [name] + [_cell(p.get(c)) for c in paper_columns] + [_cell(p.get(c)) for c in leak_columns]
            for name, p in papers.items()
        ]
        lines.append("")
        lines.append(f"Paper metrics (open-unlearning definitions; truth_ratio = mean p_c/(p_c+p_w); {FLUENCY_NOTE}):")
        lines.extend(_table(["forget set", *paper_columns, *leak_columns], paper_rows))
        if with_leak:
            samples = {p.get("leak_samples") for p in papers.values() if p.get("leak_samples")}
            lines.append(
                "leak rate: fraction of answers (greedy + "
                f"{'/'.join(str(s) for s in sorted(samples)) or '?'} samples per question, original and paraphrased "
                "question) that still contain a key string of the fact"
            )
    return "\n".join(lines)
