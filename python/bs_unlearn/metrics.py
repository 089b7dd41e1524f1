"""Evaluation metrics in the TOFU conventions (shared/SPEC.md, "Evaluation metrics").

Two layers:
- pure functions on numbers and strings (ROUGE-L, truth ratio, option-normalised probability, model utility, forget
  quality), tested against hand-computed values;
- model-facing scorers that turn (question, answer) pairs into per-sequence mean per-token log-probs with the
  package's fused ``forget_logprobs`` (one batch's logits alive at a time, never a [N, T, V] stack), and greedy
  generations for ROUGE.

Conventions followed (and where they differ from the TOFU code):
- Answer probability = exp(mean per-token log p(answer | question)), i.e. p^(1/len).
- Truth ratio R = mean_j p(perturbed_j)^(1/len_j) / p(paraphrased)^(1/len) (the TOFU paper's formula: an arithmetic
  mean of length-normalised probabilities; the TOFU code takes a geometric mean instead). Reported as
  mean(min(R, 1/R)) on forget sets and mean(max(0, 1 - R)) on the others, as TOFU does.
- Real-authors / world-facts probability = p(answer)^(1/len) / (p(answer)^(1/len) + sum_j p(option_j)^(1/len_j)).
- Model utility = harmonic mean of probability, ROUGE-L and truth score on each utility set.
- Forget quality = p-value of the two-sample KS test between the forget set's raw truth ratios under the unlearned
  model and under a retain-only model (KS is invariant to the monotone R -> 1/R, so either orientation gives it).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from bs_kernels import forget_logprobs

from .data import end_of_turn_ids, pad_examples, tokenize_prompt, tokenize_qa

# --------------------------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------------------------

_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """Lower-case alphanumeric words (the tokenisation of the rouge-score package without stemming)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return _NON_ALNUM.sub(" ", text.lower()).split()


def lcs_length(first: Sequence, second: Sequence) -> int:
    """Length of the longest common subsequence (O(len(first) * len(second)) time, O(len(second)) memory)."""
    if not first or not second:
        return 0
    previous = [0] * (len(second) + 1)
    for item in first:
        current = [0] * (len(second) + 1)
        for j, other in enumerate(second, start=1):
            current[j] = previous[j - 1] + 1 if item == other else max(previous[j], current[j - 1])
        previous = current
    return previous[-1]


def rouge_l_recall(prediction: str, reference: str) -> float:
    """ROUGE-L recall: LCS(prediction, reference) / number of reference words (0 for an empty reference)."""
    reference_tokens = rouge_tokens(reference)
    if not reference_tokens:
        return 0.0
    return lcs_length(rouge_tokens(prediction), reference_tokens) / len(reference_tokens)


def mean_token_logprobs(token_logprobs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean of per-token log-probs over the valid positions.

    Args:
        token_logprobs: [B, T] log p(label) (any value where not valid).
        valid: [B, T] bool.
    Returns: [B] float; a sequence with no valid position raises (its probability is undefined).
    """
    if token_logprobs.shape != valid.shape or token_logprobs.dim() != 2:
        raise ValueError(
            f"token_logprobs {tuple(token_logprobs.shape)} and valid {tuple(valid.shape)} must be the same [B, T] shape"
        )
    counts = valid.sum(-1)
    if bool((counts == 0).any()):
        raise ValueError("valid has a sequence with no scored token (an empty answer?)")
    return torch.where(valid, token_logprobs, 0).sum(-1) / counts


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


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean (0 if any value is 0; values must be >= 0)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0 or bool((values < 0).any()):
        raise ValueError(f"harmonic_mean needs non-negative values, got {values.tolist()}")
    if bool((values == 0).any()):
        return 0.0
    return float(values.size / np.sum(1.0 / values))


def forget_quality(unlearned_truth_ratios: Sequence[float], retain_model_truth_ratios: Sequence[float]) -> float:
    """p-value of the two-sample KS test between two models' forget-set truth ratios (high = indistinguishable)."""
    from scipy.stats import ks_2samp

    first = np.asarray(unlearned_truth_ratios, dtype=np.float64)
    second = np.asarray(retain_model_truth_ratios, dtype=np.float64)
    if first.size == 0 or second.size == 0:
        raise ValueError("forget_quality needs non-empty truth-ratio lists from both models")
    return float(ks_2samp(first, second).pvalue)


# --------------------------------------------------------------------------------------------------------------
# Scoring with a model
# --------------------------------------------------------------------------------------------------------------


@dataclass
class SequenceScores:
    """Per-sequence results of :func:`score_encodings` (numpy arrays, one entry per input sequence)."""

    mean_logprob: np.ndarray  # [N] mean per-token log p(answer token)
    num_tokens: np.ndarray  # [N] scored answer tokens
    p_label: np.ndarray | None = None  # [N] mean over answer positions of p(label)
    alt_mass: np.ndarray | None = None  # [N] mean over positions of the mass on the top-k tokens other than the label


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    return 0


def _alt_mass(logits: torch.Tensor, labels: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """p(label) and the probability of the top_k most likely tokens other than the label, per (shifted) position.

    logits [B, T, V], labels [B, T] (-100 = ignored): returns two [B, T-1] float32 tensors (0 where ignored). Only
    top_k + 1 values per position are kept besides the batch's logits: the label is in the top k + 1 or not, and the
    k most likely others are the first k of the top k + 1 after removing it.
    """
    shifted_logits = logits[:, :-1].float()
    shifted_labels = labels[:, 1:]
    valid = shifted_labels != -100
    safe_labels = shifted_labels.clamp(min=0)
    lse = torch.logsumexp(shifted_logits, dim=-1)
    p_label = torch.exp(shifted_logits.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1) - lse)
    k = min(top_k + 1, shifted_logits.shape[-1])
    top_values, top_ids = shifted_logits.topk(k, dim=-1)
    top_probs = torch.exp(top_values - lse.unsqueeze(-1))
    is_label = top_ids == safe_labels.unsqueeze(-1)
    others = top_probs.masked_fill(is_label, 0).sum(-1)
    # When the label is not among the top k + 1, the (k+1)-th token is one too many. (With V <= top_k the label is
    # always among them and every other token counts.)
    others = others - torch.where(is_label.any(-1), torch.zeros_like(others), top_probs[..., -1])
    zero = torch.zeros_like(p_label)
    return torch.where(valid, p_label, zero), torch.where(valid, others, zero)


@torch.no_grad()
def score_encodings(
    model: torch.nn.Module,
    tokenizer,
    encodings: Sequence[dict],
    *,
    batch_size: int = 16,
    token_view_top_k: int | None = None,
    impl: str = "auto",
) -> SequenceScores:
    """Mean per-token log p(answer | prompt) per sequence, with the fused ``forget_logprobs``.

    Args:
        encodings: ``data.tokenize_qa`` outputs: ``input_ids`` (prompt + answer) and ``labels`` (-100 on the prompt).
        batch_size: sequences per forward pass; only that batch's logits [batch_size, T, V] are alive at a time.
        token_view_top_k: also return, averaged over answer positions, p(label) and the mass on the k most likely
            other tokens (the token-level view of the squeezing effect).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not encodings:
        return SequenceScores(np.zeros(0), np.zeros(0, dtype=np.int64))
    was_training = model.training
    model.eval()
    device = _model_device(model)
    # Sorting by length keeps padding (and wasted compute) small; results are put back in input order.
    order = sorted(range(len(encodings)), key=lambda i: len(encodings[i]["input_ids"]))
    mean_lp = np.zeros(len(encodings))
    counts = np.zeros(len(encodings), dtype=np.int64)
    p_label = np.zeros(len(encodings)) if token_view_top_k else None
    alt_mass = np.zeros(len(encodings)) if token_view_top_k else None
    try:
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            batch = pad_examples([encodings[i] for i in index], _pad_id(tokenizer))
            input_ids, attention_mask, labels = (
                batch[key].to(device) for key in ("input_ids", "attention_mask", "labels")
            )
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
            token_lp = forget_logprobs(logits, labels, impl=impl)  # [B, T-1], 0 where ignored
            valid = labels[:, 1:] != -100
            batch_mean = mean_token_logprobs(token_lp, valid)
            mean_lp[index] = batch_mean.double().cpu().numpy()
            counts[index] = valid.sum(-1).cpu().numpy()
            if token_view_top_k:
                p_lab, others = _alt_mass(logits, labels, token_view_top_k)
                n = valid.sum(-1).clamp(min=1)
                p_label[index] = (p_lab.sum(-1) / n).double().cpu().numpy()
                alt_mass[index] = (others.sum(-1) / n).double().cpu().numpy()
            del logits
    finally:
        model.train(was_training)
    return SequenceScores(mean_lp, counts, p_label, alt_mass)


def score_answers(
    model: torch.nn.Module,
    tokenizer,
    questions: Sequence[str],
    answers: Sequence[str],
    *,
    batch_size: int = 16,
    max_length: int = 512,
    impl: str = "auto",
) -> np.ndarray:
    """[N] mean per-token log p(answer_i | question_i) (prompt format of ``data.tokenize_qa``)."""
    if len(questions) != len(answers):
        raise ValueError(f"questions ({len(questions)}) and answers ({len(answers)}) must have the same length")
    encodings = [tokenize_qa(tokenizer, q, a, max_length=max_length) for q, a in zip(questions, answers)]
    return score_encodings(model, tokenizer, encodings, batch_size=batch_size, impl=impl).mean_logprob


def _left_padded_prompts(tokenizer, questions: Sequence[str], device: torch.device):
    batch = pad_examples(
        [{"input_ids": tokenize_prompt(tokenizer, q)} for q in questions], _pad_id(tokenizer), side="left"
    )
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


def stop_token_ids(tokenizer, model: torch.nn.Module) -> list[int]:
    """The tokenizer's eos / end-of-turn ids plus the model's generation-config eos (never a hard-coded string)."""
    ids = set(end_of_turn_ids(tokenizer))
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(config_eos, int):
        ids.add(config_eos)
    elif config_eos:
        ids.update(int(i) for i in config_eos)
    return sorted(ids)


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module,
    tokenizer,
    questions: Sequence[str],
    *,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    num_return_sequences: int = 1,
    **generate_kwargs,
) -> list[list[str]]:
    """Decoded continuations per question (greedy unless generate_kwargs say otherwise), batched with left padding.

    Returns a list (one per question) of ``num_return_sequences`` strings, special tokens removed, stripped.
    """
    if batch_size < 1 or max_new_tokens < 1 or num_return_sequences < 1:
        raise ValueError(
            f"batch_size, max_new_tokens and num_return_sequences must be >= 1, got {batch_size}, {max_new_tokens}, "
            f"{num_return_sequences}"
        )
    was_training = model.training
    model.eval()
    device = _model_device(model)
    results: list[list[str]] = []
    try:
        for start in range(0, len(questions), batch_size):
            input_ids, attention_mask = _left_padded_prompts(tokenizer, questions[start : start + batch_size], device)
            generate_kwargs.setdefault("do_sample", False)
            output = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                num_return_sequences=num_return_sequences,
                pad_token_id=_pad_id(tokenizer),
                eos_token_id=stop_token_ids(tokenizer, model),
                **generate_kwargs,
            )
            new_tokens = output[:, input_ids.shape[1] :]
            texts = [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new_tokens]
            for i in range(0, len(texts), num_return_sequences):
                results.append(texts[i : i + num_return_sequences])
    finally:
        model.train(was_training)
    return results


# --------------------------------------------------------------------------------------------------------------
# Whole evaluation
# --------------------------------------------------------------------------------------------------------------


@dataclass
class EvalSet:
    """One evaluation split: TOFU records (question, answer, optional paraphrased_answer / perturbed_answer).

    role: "forget" (truth score = mean min(R, 1/R)), "retain" (mean max(0, 1 - R)), or "options" (real authors /
    world facts: probability normalised against the perturbed options, truth ratio against the gold answer).
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
) -> dict:
    """Probability, paraphrase probability, ROUGE-L recall and truth ratio of one set; summary + per-example lists."""
    records = eval_set.records
    questions = [r["question"] for r in records]
    answers = [r["answer"] for r in records]
    say = progress or (lambda message: None)
    say(f"{eval_set.name}: scoring {len(records)} answers")
    answer_lp = score_answers(model, tokenizer, questions, answers, batch_size=batch_size, impl=impl)
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
        score = forget_truth_score(ratios) if eval_set.role == "forget" else utility_truth_score(ratios)
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
    result["per_example"] = per_example
    return result


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
) -> dict:
    """Evaluate several sets; add model utility (sets with role retain/options) and forget quality.

    Args:
        retain_model_metrics: the JSON written by :func:`evaluate` for a retain-only model on the same forget set;
            enables forget quality (KS test on the forget sets' per-example truth ratios).
    Returns: {"sets": {name: {...}}, "model_utility": float | None, "forget_quality": {name: float} | None}.
    """
    names = [s.name for s in eval_sets]
    if len(set(names)) != len(names):
        raise ValueError(f"evaluation set names must be unique, got {names}")
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
        )
        for s in eval_sets
    }
    utility_parts = []
    for s in eval_sets:
        if s.role == "forget":
            continue
        metrics = sets[s.name]
        utility_parts.extend(metrics[key] for key in ("prob", "rouge_l", "truth_ratio") if key in metrics)
    output: dict = {
        "sets": sets,
        "model_utility": harmonic_mean(utility_parts) if utility_parts else None,
        "forget_quality": None,
    }
    if retain_model_metrics is not None:
        quality = {}
        for s in eval_sets:
            if s.role != "forget" or "truth_ratio" not in sets[s.name]["per_example"]:
                continue
            other = retain_model_metrics.get("sets", {}).get(s.name, {}).get("per_example", {}).get("truth_ratio")
            if other is None:
                raise ValueError(
                    f"the retain model's metrics have no per-example truth ratios for set {s.name!r}: evaluate the "
                    "retain-only model on the same forget set first"
                )
            quality[s.name] = forget_quality(sets[s.name]["per_example"]["truth_ratio"], other)
        output["forget_quality"] = quality
    return output


def format_table(results: dict) -> str:
    """A plain-text table of the summary metrics (one row per set)."""
    columns = ["prob", "paraphrase_prob", "rouge_l", "truth_ratio", "mean_logprob"]
    header = ["set", "n", *columns]
    rows = []
    for name, metrics in results["sets"].items():
        rows.append([name, str(metrics["n"])] + [f"{metrics[c]:.4f}" if c in metrics else "-" for c in columns])
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows)
    if results.get("model_utility") is not None:
        lines.append(f"model utility (harmonic mean over retain/utility sets): {results['model_utility']:.4f}")
    for name, value in (results.get("forget_quality") or {}).items():
        lines.append(f"forget quality on {name} (KS-test p-value vs the retain-only model): {value:.4g}")
    return "\n".join(lines)
