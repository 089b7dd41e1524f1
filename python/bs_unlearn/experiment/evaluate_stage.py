"""The evaluation stage: TOFU's and the paper's metrics of a model (bs_unlearn.metrics.evaluate), and the few
numbers of one evaluation that the progress lines and the equal-steps table show."""

from __future__ import annotations

import time

from ..metrics.evaluation import EvalOptions, evaluate
from .progress import Say, quiet


def evaluate_stage(
    model,
    tokenizer,
    eval_sets,
    options: EvalOptions,
    *,
    retain_model_metrics: dict | None = None,
    say: Say = quiet,
) -> dict:
    """TOFU and the paper's metrics of ``model`` on ``eval_sets`` (bs_unlearn.metrics.evaluate), with the seconds."""
    started = time.perf_counter()
    metrics = evaluate(
        model,
        tokenizer,
        eval_sets,
        options,
        retain_model_metrics=retain_model_metrics,
        progress=lambda message: say(f"  eval {message}"),
    )
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    say(f"  evaluated in {metrics['seconds']:.0f} s")
    return metrics


def forget_summary(metrics: dict, forget_name: str) -> dict:
    """The demo-table quantities of one evaluation: forget / paraphrase / retain probability, ROUGE-L, an answer."""
    forget = metrics["sets"][forget_name]
    retain = next((s for s in metrics["sets"].values() if s["role"] == "retain"), {})
    return {
        "forget_prob": forget["prob"],
        "paraphrase_prob": forget.get("paraphrase_prob"),
        "retain_prob": retain.get("prob"),
        "forget_rouge_l": forget.get("rouge_l"),
        "forget_answers": forget["per_example"].get("generation", [""]),
    }
