"""The drop-ins inside an unmodified open-unlearning checkout ($BS_OPEN_UNLEARNING_DIR), run as a user would.

open-unlearning's own entry point (src/train.py, hydra, experiment=unlearn/tofu/default) runs offline on a CPU through
``python -m bs_unlearn.integrations.open_unlearning_train`` (docs/integrations.md), on a tiny Llama-3-style
checkpoint (pad = eos, as open-unlearning sets it for Llama-3) and the local TOFU forget01 / retain99 files, with the
overrides that docs/integrations.md lists and nothing else. Three runs:

- ``trainer=BST`` (fused) and ``trainer=BST trainer.method_args.impl=reference`` (the same run with the package's
  materialised-logits reference formula): equal loss curves, gradient norms and final weights;
- ``trainer=BSS`` with regeneration every epoch over two epochs: the belief set is sampled for the 40 forget prompts
  at the start of each epoch and never for a batch.

open-unlearning needs transformers 4.x, the package's CI runs 5.x: the runs use an interpreter with the
``[open-unlearning]`` extra of pyproject.toml. ``BS_KERNELS_OU_PYTHON`` names one; else the current interpreter when
it has that extra's packages; else ``.venv-ou/`` in the repository, created on first use (a venv that sees this
interpreter's packages and adds the extra's, about a minute of pip on a fresh machine) and reused while the extra is
unchanged.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from open_unlearning_checkout import (
    CHECKOUT,
    CHECKOUT_VARIABLE,
    REPO,
    TOFU_DIR,
    TOFU_DIR_VARIABLE,
    offline_cpu_overrides,
    offline_environment,
)
from open_unlearning_checkout import open_unlearning_python as open_unlearning_interpreter

pytestmark = [
    pytest.mark.open_unlearning,
    pytest.mark.skipif(
        not (CHECKOUT / "src" / "train.py").is_file(),
        reason=f"no open-unlearning checkout at {CHECKOUT}: set {CHECKOUT_VARIABLE} to one",
    ),
    pytest.mark.skipif(
        not (TOFU_DIR / "forget01.jsonl").is_file(),
        reason=f"TOFU data not found at {TOFU_DIR}: set {TOFU_DIR_VARIABLE} to a folder holding forget01.jsonl etc.",
    ),
]

FORGET_PROMPTS = 40  # rows of forget01.jsonl, all distinct questions


@pytest.fixture(scope="module")
def open_unlearning_python() -> str:
    return open_unlearning_interpreter()


def run_arguments(model_dir: Path, output_root: Path, trainer: str, task: str, *extra: str) -> list[str]:
    """The launcher's arguments for one run (``python -m bs_unlearn.integrations.open_unlearning_train ARGS``)."""
    return [
        "--checkout",
        str(CHECKOUT),
        "--config-name=unlearn.yaml",
        "experiment=unlearn/tofu/default",
        f"trainer={trainer}",
        f"task_name={task}",
        *offline_cpu_overrides(model_dir, output_root, TOFU_DIR),
        "trainer.args.per_device_train_batch_size=4",
        "trainer.args.logging_steps=1",
        "trainer.args.learning_rate=1e-3",
        *extra,
    ]


@pytest.fixture(scope="module")
def runs(open_unlearning_python, tmp_path_factory) -> Path:
    """Builds the checkpoint and runs the three trainings in one process (the imports dominate each run's time);
    returns the work folder (model/, out/saves/unlearn/<task>/)."""
    work = tmp_path_factory.mktemp("open_unlearning")
    model_dir, output_root = work / "model", work / "out"
    # 16 rows a step (4 x open-unlearning's 4 accumulation steps) over 40 forget rows: 3 steps an epoch.
    plan = {
        "model_dir": str(model_dir),
        "runs": [
            run_arguments(model_dir, output_root, "BST", "bst_fused", "+trainer.args.max_steps=3"),
            run_arguments(
                model_dir,
                output_root,
                "BST",
                "bst_reference",
                "+trainer.args.max_steps=3",
                "trainer.method_args.impl=reference",
            ),
            run_arguments(
                model_dir,
                output_root,
                "BSS",
                "bss",
                "+trainer.args.max_steps=5",
                "trainer.method_args.regeneration_epochs=1",
                "trainer.method_args.max_new_tokens=8",
                "trainer.method_args.n_samples=2",
                "trainer.method_args.generation_batch_size=20",
            ),
        ],
    }
    (work / "plan.json").write_text(json.dumps(plan))
    env = offline_environment(work)
    script = Path(__file__).with_name("open_unlearning_checkout.py")
    result = subprocess.run(
        [open_unlearning_python, str(script), "plan", str(work / "plan.json")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return work


def log_history(work: Path, task: str) -> list[dict]:
    return json.loads((work / "out" / "saves" / "unlearn" / task / "trainer_state.json").read_text())["log_history"]


def weights(work: Path, task: str | None) -> dict:
    """The saved weights of a run (``task``), or of the checkpoint every run started from (None)."""
    from safetensors.torch import load_file

    folder = work / "model" if task is None else work / "out" / "saves" / "unlearn" / task
    return load_file(str(folder / "model.safetensors"))


def test_bst_in_open_unlearning_equals_the_reference_formula(runs):
    import torch

    fused, reference = log_history(runs, "bst_fused"), log_history(runs, "bst_reference")
    fused_steps = [entry for entry in fused if "loss" in entry]
    reference_steps = [entry for entry in reference if "loss" in entry]
    assert [entry["step"] for entry in fused_steps] == [1, 2, 3]
    # The Trainer logs the loss rounded to 4 decimals; the gradient norm unrounded.
    assert [entry["loss"] for entry in fused_steps] == [entry["loss"] for entry in reference_steps]
    torch.testing.assert_close(
        torch.tensor([entry["grad_norm"] for entry in fused_steps]),
        torch.tensor([entry["grad_norm"] for entry in reference_steps]),
        atol=0,
        rtol=1e-5,
    )
    assert len({entry["loss"] for entry in fused_steps}) > 1  # training moved the loss: the curve can differ
    start, after_fused, after_reference = (weights(runs, task) for task in (None, "bst_fused", "bst_reference"))
    for name, initial in start.items():
        moved = (after_fused[name] - initial).abs().max()
        assert moved > 1e-4, name
        # Adam's steps are ~lr = 1e-3 per element; fused and reference runs agree far below that.
        torch.testing.assert_close(after_fused[name], after_reference[name], atol=1e-5, rtol=0, msg=name)


def test_bss_in_open_unlearning_samples_the_belief_set_once_per_regeneration(runs):
    history = log_history(runs, "bss")
    sampled = [entry for entry in history if "bss_sampled_prompts" in entry]
    steps = [entry for entry in history if "loss" in entry]
    assert [entry["step"] for entry in steps] == [1, 2, 3, 4, 5]
    # Epoch 0 at the start, epoch 1 after step 3 (regeneration_epochs=1); every batch prompt was found in the set.
    assert [(entry["epoch"], entry["step"], entry["bss_sampled_prompts"]) for entry in sampled] == [
        (0, 0, FORGET_PROMPTS),
        (1.0, 3, FORGET_PROMPTS),
    ]
    assert all(entry["bss_sampled_on_demand"] == 0 for entry in sampled)
