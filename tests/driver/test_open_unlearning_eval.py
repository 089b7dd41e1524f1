"""``bs-unlearn eval`` against open-unlearning's own TOFU evaluation, on the same tiny models and the same files.

open-unlearning's ``src/eval.py`` with ``experiment=eval/tofu/default`` (tests/driver/open_unlearning_eval.py, run
by the interpreter of tests/driver/test_open_unlearning_checkout.py) and ``bs-unlearn eval --tofu-dir`` (run as a
user runs it, with its defaults) evaluate two tiny Llama-3.2-style models, fine-tuned 20 and 80 steps on the
answers, on five rows of each TOFU evaluation file (forget01, retain_perturbed, real_authors_perturbed,
world_facts_perturbed); the first model's logs are the second's retain-model logs (forget quality).

Every metric both compute is compared, per question where open-unlearning logs one: probabilities, truth ratios,
option-normalised probabilities and model utility to 1e-4; ROUGE-L recall, Exact Memorization and Extraction Strength
exactly. What is left out on purpose:

- fluency / gibberish (``forget_Q_A_gibberish``): a classifier from the hub, which cannot be had offline; neither
  side computes it here, and bs-unlearn's tables say so;
- privleak and the MIA attacks (``privleak``, ``mia_*``): membership-inference scores that bs-unlearn does not
  compute (the runner drops ``privleak`` from the TOFU metrics);
- bs-unlearn's own additions (mean log-prob, the paper block's p_c / (p_c + p_w) truth ratio, Mem / Agg, leak rate)
  have no open-unlearning TOFU counterpart.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from open_unlearning_checkout import (
    CHECKOUT,
    CHECKOUT_VARIABLE,
    REPO,
    TOFU_DIR,
    TOFU_DIR_VARIABLE,
    offline_environment,
    open_unlearning_python,
)

pytestmark = [
    pytest.mark.open_unlearning,
    pytest.mark.skipif(
        not (CHECKOUT / "src" / "eval.py").is_file(),
        reason=f"no open-unlearning checkout at {CHECKOUT}: set {CHECKOUT_VARIABLE} to one",
    ),
    pytest.mark.skipif(
        not (TOFU_DIR / "forget01.jsonl").is_file(),
        reason=f"TOFU data not found at {TOFU_DIR}: set {TOFU_DIR_VARIABLE} to a folder holding forget01.jsonl etc.",
    ),
]

ROWS = 5
# TOFU config name (open-unlearning's hf_args.name) -> file of the TOFU folder (bs-unlearn eval --tofu-dir).
FILES = {
    "forget01_perturbed": "forget01.jsonl",
    "retain_perturbed": "retain_perturbed.jsonl",
    "real_authors_perturbed": "real_authors_perturbed.jsonl",
    "world_facts_perturbed": "world_facts_perturbed.jsonl",
}
MODELS = {"retain_only": 20, "unlearned": 80}  # full-batch fine-tuning steps
# bs-unlearn set name -> open-unlearning's metric-name prefix.
PREFIXES = {"forget01": "forget", "retain": "retain", "real_authors": "ra", "world_facts": "wf"}


@pytest.fixture(scope="module")
def evaluations(tmp_path_factory) -> dict:
    """{model: (bs-unlearn's metrics JSON, open-unlearning's TOFU_EVAL.json)}."""
    work = tmp_path_factory.mktemp("open_unlearning_eval")
    data = work / "tofu"
    data.mkdir()
    for file in FILES.values():
        rows = (TOFU_DIR / file).read_text(encoding="utf-8").splitlines()[:ROWS]
        (data / file).write_text("\n".join(rows) + "\n", encoding="utf-8")
    plan = {
        "work": str(work),
        "files": {name: str(data / file) for name, file in FILES.items()},
        "models": MODELS,
        "evals": [{"model": "retain_only"}, {"model": "unlearned", "retain_model": "retain_only"}],
    }
    (work / "plan.json").write_text(json.dumps(plan))
    env = offline_environment(work)
    runner = Path(__file__).with_name("open_unlearning_eval.py")
    result = subprocess.run(
        [open_unlearning_python(), str(runner), str(work / "plan.json")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    results = {}
    for model in MODELS:
        output = work / f"{model}.json"
        retain = ["--retain-model-metrics", str(work / "retain_only.json")] if model == "unlearned" else []
        command = [
            sys.executable,
            "-m",
            "bs_unlearn.cli",
            "eval",
            "--model",
            str(work / model),
            "--tofu-dir",
            str(data),
            "--split",
            "forget01",
            "--output",
            str(output),
            "--quiet",
            *retain,
        ]
        ours = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert ours.returncode == 0, ours.stdout[-3000:] + ours.stderr[-6000:]
        logs = work / "saves" / "eval" / model / "TOFU_EVAL.json"
        results[model] = (json.loads(output.read_text()), json.loads(logs.read_text()))
    return results


def by_index(logs: dict, metric: str, key: str) -> list:
    """Per question (in file order) the value ``key`` of an open-unlearning metric."""
    values = logs[metric]["value_by_index"]
    return [values[str(i)][key] for i in range(len(values))]


def close(ours, theirs, tolerance: float = 1e-4) -> bool:
    """Equal to ``tolerance``, relative above 1: open-unlearning computes in float32, and a truth ratio far above 1
    (a question whose perturbed answers are much likelier) carries float32's relative error, not an absolute one."""
    return len(ours) == len(theirs) and all(abs(a - b) <= tolerance * max(1.0, abs(b)) for a, b in zip(ours, theirs))


@pytest.mark.parametrize("model", list(MODELS))
def test_answer_probabilities_match_open_unlearning(evaluations, model):
    import numpy as np

    ours, theirs = evaluations[model]
    for name, prefix in PREFIXES.items():
        metrics = ours["sets"][name]
        # Per question: p = exp(-mean NLL of the answer tokens) (open-unlearning's "prob", from its "avg_loss").
        answer = np.exp(metrics["per_example"]["answer_mean_logprob"]).tolist()
        assert close(answer, by_index(theirs, f"{prefix}_Q_A_Prob", "prob")), (model, name)
        perturbed = [np.exp(row).tolist() for row in metrics["per_example"]["perturbed_mean_logprob"]]
        for mine, other in zip(perturbed, by_index(theirs, f"{prefix}_Q_A_PERT_Prob", "prob")):
            assert close(mine, other), (model, name)
        if prefix in ("forget", "retain"):
            paraphrase = np.exp(metrics["per_example"]["paraphrase_mean_logprob"]).tolist()
            assert close(paraphrase, by_index(theirs, f"{prefix}_Q_A_PARA_Prob", "prob")), (model, name)
            assert abs(metrics["paraphrase_prob"] - theirs[f"{prefix}_Q_A_PARA_Prob"]["agg_value"]) <= 1e-4
        # Real authors / world facts: the answer's probability normalised against its perturbed options.
        reference = f"{prefix}_Q_A_Prob_normalised" if prefix in ("ra", "wf") else f"{prefix}_Q_A_Prob"
        assert abs(metrics["prob"] - theirs[reference]["agg_value"]) <= 1e-4, (model, name, metrics["prob"])


@pytest.mark.parametrize("model", list(MODELS))
def test_truth_ratios_and_model_utility_match_open_unlearning(evaluations, model):
    ours, theirs = evaluations[model]
    for name, prefix in PREFIXES.items():
        metrics = ours["sets"][name]
        metric = "forget_truth_ratio" if prefix == "forget" else f"{prefix}_Truth_Ratio"
        # Per question R = p(perturbed) / p(reference), p(perturbed) the geometric mean over the perturbed answers.
        assert close(metrics["per_example"]["truth_ratio"], by_index(theirs, metric, "score")), (model, name)
        # Forget: mean min(R, 1/R); the others: mean max(0, 1 - R).
        assert abs(metrics["truth_ratio"] - theirs[metric]["agg_value"]) <= 1e-4, (model, name)
    # The harmonic mean of the nine retain / real-authors / world-facts parts.
    assert abs(ours["model_utility"] - theirs["model_utility"]["agg_value"]) <= 1e-4
    if model == "unlearned":
        assert ours["model_utility"] > 0.1  # every part is above 0: the comparison is not 0 == 0


def test_forget_quality_matches_open_unlearning(evaluations):
    ours, theirs = evaluations["unlearned"]
    assert ours["forget_quality"]["forget01"] == pytest.approx(theirs["forget_quality"]["agg_value"], abs=1e-12)


@pytest.mark.parametrize("model", list(MODELS))
def test_greedy_answers_and_rouge_match_open_unlearning_exactly(evaluations, model):
    ours, theirs = evaluations[model]
    for name, prefix in PREFIXES.items():
        metrics = ours["sets"][name]
        # Greedy answers of up to 200 new tokens, decoded without special tokens and stripped.
        assert metrics["per_example"]["generation"] == by_index(theirs, f"{prefix}_Q_A_ROUGE", "generation"), name
        assert metrics["per_example"]["rouge_l"] == by_index(theirs, f"{prefix}_Q_A_ROUGE", "rougeL_recall"), name
        assert metrics["rouge_l"] == theirs[f"{prefix}_Q_A_ROUGE"]["agg_value"], name


@pytest.mark.parametrize("model", list(MODELS))
def test_memorization_matches_open_unlearning_exactly(evaluations, model):
    import numpy as np

    ours, theirs = evaluations[model]
    forget = ours["sets"]["forget01"]
    # The same fraction of answer positions (open-unlearning divides EM's count in float32, so compared there).
    assert np.float32(forget["per_example"]["em"]).tolist() == by_index(theirs, "exact_memorization", "score")
    assert forget["per_example"]["es"] == by_index(theirs, "extraction_strength", "score")
    assert forget["paper"]["em"] == pytest.approx(theirs["exact_memorization"]["agg_value"], rel=1e-6)
    assert forget["paper"]["es"] == theirs["extraction_strength"]["agg_value"]
