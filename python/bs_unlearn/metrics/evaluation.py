"""The evaluation of a model over QA sets: TOFU's metrics per set, model utility, forget quality and, per forget set,
the paper's block (docs/math.md, "Evaluation protocol").

    options = EvalOptions(leak_samples=2)
    results = evaluate(model, tokenizer, eval_sets, options, retain_model_metrics=...)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..generation import generate_answers
from ..prompts import PromptFormat
from ..scoring import score_answers, score_qa
from ..tofu_data import EvalSet
from .leak import measure_leak
from .paper import (
    ES_CONVENTIONS,
    agg_score,
    exact_memorization,
    extraction_strength,
    forget_quality,
    mean_exact_memorization,
    mean_extraction_strength,
    mem_score,
    paper_truth_ratio,
)
from .tofu import (
    answer_probability,
    forget_truth_score,
    model_utility,
    option_normalized_probability,
    rouge_l_recall,
    truth_ratio,
    utility_truth_score,
)

Progress = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """How an evaluation runs: the prompts, batch size, generation, backend, the leak rate's sampling, the ES
    convention. The defaults are open-unlearning's TOFU evaluation (docs/math.md, "Evaluation protocol").

    Args:
        prompt_format: how questions become prompts (:class:`prompts.PromptFormat`: open-unlearning's template
            arguments, system prompt "You are a helpful assistant." and date_string "10 Apr 2025" by default). Every
            answer is scored and generated the way open-unlearning does it (``prompts.encode_qa``; no token equal to
            the pad id is attended to).
        batch_size: questions per scoring call and per call of the leak rate's sampling (the numbers do not depend
            on it beyond float noise; the samples do, through the random stream).
        generation_batch_size: questions per greedy-answer call. Each answer leaves its batch when it stops
            (:func:`generation.greedy_continuations`), so a larger batch costs little where answers are short and
            reads the weights once per step for more rows where they run long: 64 generates TOFU's sets about twice
            as fast as 16 on a CPU (docs/driver.md), the same tokens.
        max_new_tokens: the greedy answers (ROUGE-L) stop at the end of their turn or after this many tokens
            (open-unlearning's 200); by default also the length of the leak rate's answers.
        generate: greedy answers and ROUGE-L; without them model utility lacks its ROUGE-L parts and is None.
        impl: the bs_kernels backend of the log-probs.
        leak_samples: > 0 asks for the leak rate on forget sets whose records all carry ``keys``: per question the
            greedy answer plus ``leak_samples`` samples at ``leak_temperature`` (pure sampling, seeded with
            ``seed``, the global RNG restored), asked with the question and, where every record has one, with the
            ``paraphrased_question`` (seed + 1); ``leak_max_new_tokens`` defaults to ``max_new_tokens``.
        es_convention: "open-unlearning" (its code, the default) or "definition" (docs/math.md): how ES scores an
            answer of which no suffix is reproduced (1/T or 0; see :func:`metrics.paper.extraction_strength`).
    """

    prompt_format: PromptFormat = PromptFormat()
    batch_size: int = 16
    generation_batch_size: int = 64
    max_new_tokens: int = 200
    generate: bool = True
    impl: str = "auto"
    leak_samples: int = 0
    leak_temperature: float = 1.0
    leak_max_new_tokens: int | None = None
    seed: int = 0
    es_convention: str = "open-unlearning"

    def __post_init__(self) -> None:
        if not isinstance(self.prompt_format, PromptFormat):
            raise TypeError(f"prompt_format must be a PromptFormat, got {type(self.prompt_format).__name__}")
        for name in ("batch_size", "generation_batch_size", "max_new_tokens"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        if not _is_int(self.leak_samples) or self.leak_samples < 0:
            raise ValueError(f"leak_samples must be >= 0, got {self.leak_samples}")
        if self.leak_max_new_tokens is not None and (
            not _is_int(self.leak_max_new_tokens) or self.leak_max_new_tokens < 1
        ):
            raise ValueError(f"leak_max_new_tokens must be None or an int >= 1, got {self.leak_max_new_tokens!r}")
        if not self.leak_temperature > 0:
            raise ValueError(f"leak_temperature must be > 0, got {self.leak_temperature}")
        if self.es_convention not in ES_CONVENTIONS:
            raise ValueError(f"es_convention must be 'open-unlearning' or 'definition', got {self.es_convention!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _quiet(message: str) -> None:
    del message


def _mean_probability(mean_logprobs) -> float | None:
    """The set's mean p^(1/len) from per-example mean log-probs (None without them)."""
    return None if mean_logprobs is None else float(answer_probability(mean_logprobs).mean())


def _perturbed_lists(records: Sequence[dict]) -> list[list[str]] | None:
    """Each record's perturbed answers; None for a set without them (no truth ratio). A record without usable ones
    in a set that has them is an error: dropping the set's truth ratio for it would change the results silently
    (``data.check_qa_record`` refuses such records as a file is read; records built in code reach this check)."""
    if all(record.get("perturbed_answer") is None for record in records):
        return None
    lists = []
    for index, record in enumerate(records):
        perturbed = record.get("perturbed_answer")
        if isinstance(perturbed, str):
            perturbed = [perturbed]
        if not perturbed or not all(isinstance(answer, str) and answer.strip() for answer in perturbed):
            raise ValueError(
                f"record {index + 1} ({record['question'][:60]!r}): perturbed_answer "
                f"{record.get('perturbed_answer')!r} has no answer to score, so its set has no truth ratio"
            )
        lists.append(list(perturbed))
    return lists


def _score_perturbed(model, tokenizer, questions, perturbed, options: EvalOptions) -> list[list[float]]:
    """Mean per-token log-probs of every perturbed answer, one list per question (scored in one flat pass)."""
    flat_questions = [q for q, answers in zip(questions, perturbed) for _ in answers]
    flat_answers = [a for answers in perturbed for a in answers]
    flat_lp = score_answers(
        model,
        tokenizer,
        flat_questions,
        flat_answers,
        batch_size=options.batch_size,
        impl=options.impl,
        prompt_format=options.prompt_format,
    )
    rows, offset = [], 0
    for answers in perturbed:
        rows.append(flat_lp[offset : offset + len(answers)].tolist())
        offset += len(answers)
    return rows


def _paper_block(model, tokenizer, eval_set, answer_scores, per_example: dict, options: EvalOptions, say) -> dict:
    """The per-set part of a forget set's paper block (es, em, paraphrase_prob, truth_ratio, the leak rate); adds
    its per-example values to ``per_example``. :func:`evaluate` adds mem, util, agg and forget quality."""
    records = eval_set.records
    matches = answer_scores.argmax_match
    em_values = [exact_memorization(m) for m in matches]
    per_example["em"] = [None if math.isnan(v) else v for v in em_values]
    per_example["es"] = [extraction_strength(m, convention=options.es_convention) for m in matches]
    em = mean_exact_memorization(matches)
    paper: dict = {
        "es": mean_extraction_strength(matches, convention=options.es_convention),
        "es_convention": options.es_convention,
        "em": None if math.isnan(em) else em,
        "paraphrase_prob": _mean_probability(per_example.get("paraphrase_mean_logprob")),
        "truth_ratio": None,
    }
    if "perturbed_mean_logprob" in per_example and "paraphrase_mean_logprob" in per_example:
        paper_ratios = paper_truth_ratio(per_example["perturbed_mean_logprob"], per_example["paraphrase_mean_logprob"])
        per_example["paper_truth_ratio"] = paper_ratios.tolist()
        paper["truth_ratio"] = float(paper_ratios.mean())
    if options.leak_samples > 0:
        if all(r.get("keys") for r in records):
            say(f"{eval_set.name}: leak rate from greedy + {options.leak_samples} samples per question")
            summary, leak_per_example = measure_leak(
                model,
                tokenizer,
                records,
                num_samples=options.leak_samples,
                temperature=options.leak_temperature,
                max_new_tokens=options.leak_max_new_tokens or options.max_new_tokens,
                batch_size=options.batch_size,
                seed=options.seed,
                prompt_format=options.prompt_format,
                # The greedy answers are reused when they were generated at the leak rate's length.
                greedy=per_example.get("generation") if not options.leak_max_new_tokens else None,
            )
            paper.update(summary)
            per_example["leak"] = leak_per_example
        else:
            say(f"{eval_set.name}: no leak rate (not every record has 'keys')")
            paper["leak_rate"] = None
    return paper


def evaluate_set(
    model: torch.nn.Module,
    tokenizer,
    eval_set: EvalSet,
    options: EvalOptions = EvalOptions(),
    *,
    progress: Progress | None = None,
) -> dict:
    """Probability, paraphrase probability, ROUGE-L recall and truth ratio of one set; summary + per-example lists.

    A forget set also gets the per-set part of the paper block (``"paper"``: es, em, paraphrase_prob, truth_ratio,
    and the leak rate when ``options.leak_samples`` > 0 and every record has ``keys``); :func:`evaluate` adds mem,
    util, agg and forget quality.
    """
    records = eval_set.records
    questions = [r["question"] for r in records]
    answers = [r["answer"] for r in records]
    forget = eval_set.role == "forget"
    say = progress or _quiet
    batch = dict(batch_size=options.batch_size, impl=options.impl, prompt_format=options.prompt_format)
    say(f"{eval_set.name}: scoring {len(records)} answers")
    # One pass gives the log-probs and (forget sets) the teacher-forced argmax matches of EM / ES.
    answer_scores = score_qa(model, tokenizer, questions, answers, memorization=forget, **batch)
    answer_lp = answer_scores.mean_logprob
    result: dict = {"n": len(records), "role": eval_set.role}
    per_example: dict = {"answer_mean_logprob": answer_lp.tolist()}

    paraphrase_lp = None
    if all(isinstance(r.get("paraphrased_answer"), str) for r in records):
        paraphrases = [r["paraphrased_answer"] for r in records]
        paraphrase_lp = score_answers(model, tokenizer, questions, paraphrases, **batch)
        per_example["paraphrase_mean_logprob"] = paraphrase_lp.tolist()
        result["paraphrase_prob"] = _mean_probability(paraphrase_lp)

    perturbed = _perturbed_lists(records)
    perturbed_lp = None
    if perturbed is not None:
        say(f"{eval_set.name}: scoring {sum(map(len, perturbed))} perturbed answers")
        perturbed_lp = _score_perturbed(model, tokenizer, questions, perturbed, options)
        per_example["perturbed_mean_logprob"] = perturbed_lp

    if eval_set.role == "options" and perturbed_lp is not None:
        result["prob"] = float(option_normalized_probability(answer_lp, perturbed_lp).mean())
    else:
        result["prob"] = float(answer_probability(answer_lp).mean())
    result["mean_logprob"] = float(answer_lp.mean())

    if perturbed_lp is not None:
        # TOFU compares the perturbed answers with the paraphrase where there is one, with the answer otherwise.
        ratios = truth_ratio(perturbed_lp, paraphrase_lp if paraphrase_lp is not None else answer_lp)
        per_example["truth_ratio"] = ratios.tolist()
        result["truth_ratio"] = forget_truth_score(ratios) if forget else utility_truth_score(ratios)

    if options.generate:
        say(f"{eval_set.name}: greedy generation for {len(records)} questions")
        generated = generate_answers(
            model,
            tokenizer,
            questions,
            max_new_tokens=options.max_new_tokens,
            batch_size=options.generation_batch_size,
            prompt_format=options.prompt_format,
        )
        generations = [texts[0] for texts in generated]
        rouge = [rouge_l_recall(g, a) for g, a in zip(generations, answers)]
        per_example["generation"] = generations
        per_example["rouge_l"] = rouge
        result["rouge_l"] = float(np.mean(rouge))

    if forget:
        result["paper"] = _paper_block(model, tokenizer, eval_set, answer_scores, per_example, options, say)
    result["per_example"] = per_example
    return result


def evaluate(
    model: torch.nn.Module,
    tokenizer,
    eval_sets: Sequence[EvalSet],
    options: EvalOptions = EvalOptions(),
    *,
    retain_model_metrics: dict | None = None,
    progress: Progress | None = None,
) -> dict:
    """Evaluate several sets; add model utility (sets with role retain/options), forget quality and, per forget set,
    the paper's metrics.

    Args:
        options: how to evaluate (:class:`EvalOptions`).
        retain_model_metrics: the JSON written by :func:`evaluate` for a retain-only model on the same forget set;
            enables forget quality (KS test on the forget sets' per-example truth ratios).
        progress: called with one line per step.
    Returns: {"sets": {name: {...}}, "model_utility": float | None, "model_utility_parts": int,
        "model_utility_missing": [...], "forget_quality": {name: float} | None}. Model utility is None when there is
        no utility set or when a utility set lacks one of its three parts (``model_utility_missing`` names them,
        e.g. ``"retain.rouge_l"`` without generation), never a mean over fewer parts. Each forget set's entry has a
        ``"paper"`` block (the paper's Table 1 metrics as open-unlearning computes them):

        - ``es``, ``em``: Extraction Strength and Exact Memorization of the forget answers (open-unlearning's
          definitions), ``es_convention``;
        - ``paraphrase_prob``: mean p(paraphrased answer)^(1/len) (None without paraphrased answers);
        - ``truth_ratio``: mean p_c / (p_c + p_w) (:func:`metrics.paper.paper_truth_ratio`; None without perturbed
          answers);
        - ``mem`` = HM(1 - es, 1 - em, 1 - paraphrase_prob, 1 - truth_ratio), ``util`` = model utility,
          ``agg`` = HM(mem, util) (None where a part is missing). Fluency is left out of Util: it needs a
          gibberish classifier that cannot be had offline, and no other score stands in for it;
        - ``forget_quality`` (with ``retain_model_metrics``): open-unlearning's forget quality, the KS p-value on
          the per-example paper truth ratios (a monotone function of open-unlearning's geometric-mean truth ratio);
        - with ``options.leak_samples`` > 0: ``leak_rate`` (pooled over both phrasings; None when the records carry
          no keys), ``leak_rate_original``, ``leak_rate_paraphrased`` (with paraphrased questions), ``leak_samples``,
          ``leak_temperature``; the answers are in ``per_example["leak"]``.
    """
    names = [s.name for s in eval_sets]
    if len(set(names)) != len(names):
        raise ValueError(f"evaluation set names must be unique, got {names}")
    sets = {s.name: evaluate_set(model, tokenizer, s, options, progress=progress) for s in eval_sets}
    utility, missing = model_utility(sets)
    utility_sets = sum(metrics["role"] != "forget" for metrics in sets.values())
    output: dict = {
        "sets": sets,
        "model_utility": utility,
        "model_utility_parts": 3 * utility_sets - len(missing),
        "model_utility_missing": missing,
        "forget_quality": None,
    }
    for metrics in sets.values():
        paper = metrics.get("paper")
        if paper is None:
            continue
        parts = (paper["es"], paper["em"], paper["paraphrase_prob"], paper["truth_ratio"])
        paper["mem"] = mem_score(*parts) if all(p is not None for p in parts) else None
        paper["util"] = utility
        paper["agg"] = agg_score(paper["mem"], utility) if None not in (paper["mem"], utility) else None
    if retain_model_metrics is not None:
        output["forget_quality"] = _forget_qualities(sets, retain_model_metrics)
    return output


def _forget_qualities(sets: dict, retain_model_metrics: dict) -> dict:
    """Forget quality of each forget set against the retain-only model's metrics (TOFU's, on the raw truth ratios;
    the paper's, on the paper truth ratios, into the paper block)."""
    quality = {}
    for name, metrics in sets.items():
        if metrics["role"] != "forget" or "truth_ratio" not in metrics["per_example"]:
            continue
        retain_set = retain_model_metrics.get("sets", {}).get(name, {})
        other = retain_set.get("per_example", {})
        if other.get("truth_ratio") is None:
            raise ValueError(
                f"the retain model's metrics have no per-example truth ratios for set {name!r}: evaluate the "
                "retain-only model on the same forget set first"
            )
        quality[name] = forget_quality(metrics["per_example"]["truth_ratio"], other["truth_ratio"])
        mine = metrics["per_example"].get("paper_truth_ratio")
        if mine is not None and other.get("paper_truth_ratio") is not None:
            metrics["paper"]["forget_quality"] = forget_quality(mine, other["paper_truth_ratio"])
    return quality
