"""Evaluation metrics (docs/math.md, "Evaluation metrics" and "Evaluation protocol"), one module per seam:

    metrics.tofu        TOFU's: answer probability, ROUGE-L recall, truth ratios, option-normalised probability,
                        model utility (pure functions on numbers and strings)
    metrics.paper       the paper's, as open-unlearning computes them: EM, ES, its truth ratio, Mem, Agg, forget
                        quality
    metrics.leak        the leak rate: key matching, and the greedy + sampled answers it is measured on
    metrics.evaluation  a model over QA sets: EvalOptions, evaluate_set, evaluate
    metrics.table       the plain-text table of an evaluation

Every public name is also importable from ``bs_unlearn.metrics``.
"""

from __future__ import annotations

from ..tofu_data import EvalSet
from .evaluation import EvalOptions, evaluate, evaluate_set
from .leak import contains_key, leak_rate, measure_leak, question_leak_rates
from .paper import (
    ES_CONVENTIONS,
    FLUENCY_NOTE,
    agg_score,
    exact_memorization,
    extraction_strength,
    forget_quality,
    mean_exact_memorization,
    mean_extraction_strength,
    mem_score,
    paper_truth_ratio,
)
from .table import format_table
from .tofu import (
    UTILITY_PARTS,
    answer_probability,
    forget_truth_score,
    harmonic_mean,
    model_utility,
    option_normalized_probability,
    per_example_rows,
    rouge_l_recall,
    rouge_tokens,
    truth_ratio,
    utility_truth_score,
)

__all__ = [
    "ES_CONVENTIONS",
    "FLUENCY_NOTE",
    "UTILITY_PARTS",
    "EvalOptions",
    "EvalSet",
    "agg_score",
    "answer_probability",
    "contains_key",
    "evaluate",
    "evaluate_set",
    "exact_memorization",
    "extraction_strength",
    "forget_quality",
    "forget_truth_score",
    "format_table",
    "harmonic_mean",
    "leak_rate",
    "mean_exact_memorization",
    "mean_extraction_strength",
    "measure_leak",
    "mem_score",
    "model_utility",
    "option_normalized_probability",
    "paper_truth_ratio",
    "per_example_rows",
    "question_leak_rates",
    "rouge_l_recall",
    "rouge_tokens",
    "truth_ratio",
    "utility_truth_score",
]
