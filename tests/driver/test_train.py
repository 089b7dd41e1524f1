"""The Trainer-based driver on a tiny random Llama: every method forgets, fine-tuning memorises, outputs are sound."""

from __future__ import annotations

import json

import pytest
import torch
from bs_unlearn import BeliefConfig, FinetuneConfig, ObjectiveConfig, UnlearnConfig, finetune, unlearn
from bs_unlearn.data import load_qa_jsonl, pad_examples, tokenize_dataset
from bs_unlearn.objectives import answer_mask
from bs_unlearn.outputs import is_own_output, mark_output_dir
from driver_fixtures import tiny_setup  # noqa: F401  (pytest fixture)
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

import bs_kernels


def mean_answer_logprob(model, tokenizer, path) -> float:
    """Mean per-token log p(answer | question) over a QA file (an independent measurement, no Trainer)."""
    examples = tokenize_dataset(load_qa_jsonl(path), tokenizer)
    batch = pad_examples(examples, tokenizer.pad_token_id)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        token_logprobs = bs_kernels.forget_logprobs(logits, batch["labels"], impl="torch")
    mask = answer_mask(batch["labels"])
    return float((token_logprobs * mask).sum() / mask.sum())


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def _tiny_unlearn_config(setup, method: str, **fields) -> UnlearnConfig:
    """An unlearning run of ``method`` on the tiny setup's files, batches of 2, no progress bar."""
    fields = {"batch_size": 2, **fields}
    return UnlearnConfig(
        objective=ObjectiveConfig(method=method),
        forget=str(setup["forget"]),
        retain=str(setup["retain"]),
        model=str(setup["model"]),
        progress=False,
        **fields,
    )


@pytest.mark.parametrize(
    "method, extra",
    [
        ("ga", {}),
        ("graddiff", {}),
        ("graddiff", {"retain_loss": "kl"}),
        ("npo", {}),
        ("bs-t", {}),
        ("bs-s", {"beliefs": {"max_new_tokens": 6}}),
        # Without a retain term: the tiny retain answers share the forget answers' template, so retain NLL pulls
        # the forget log-probs up, and BS-T at half weight is too gentle to win that in four steps.
        (
            "bs-s",
            {
                "objective": {"bs_s_base": "bs_t", "retain_loss": None},
                "beliefs": {"max_new_tokens": 6, "on_policy": True, "regen_every": 1},
            },
        ),
    ],
)
def test_each_method_lowers_forget_logprobs(tiny_setup, method, extra):  # noqa: F811
    model, tokenizer = _load(tiny_setup["model"])
    before = mean_answer_logprob(model, tokenizer, tiny_setup["forget"])
    config = UnlearnConfig(
        objective=ObjectiveConfig(method=method, **extra.get("objective", {})),
        beliefs=BeliefConfig(**extra.get("beliefs", {})),
        forget=str(tiny_setup["forget"]),
        retain=str(tiny_setup["retain"]),
        model=str(tiny_setup["model"]),
        max_steps=4,
        batch_size=4,
        lr=5e-3,
        progress=False,
    )
    result = unlearn(config)
    after = mean_answer_logprob(result.model, tokenizer, tiny_setup["forget"])
    assert after < before - 0.05, (method, before, after)
    steps = [entry for entry in result.log_history if "loss" in entry]
    assert len(steps) == 4 and all("forget_logprob" in entry for entry in steps)
    if method == "bs-s":
        assert all("belief_logprob" in entry for entry in steps)
    # The logged forget log-prob (pre-step, per batch) starts at the model's initial value.
    assert steps[0]["forget_logprob"] == pytest.approx(before, abs=0.05)


def test_bs_s_samples_beliefs_that_end_like_a_forget_answer(tiny_setup, monkeypatch):  # noqa: F811
    """The driver hands sample_beliefs a forget example's labels (answer_labels), so beliefs that stop carry what the
    answers carry after their end-of-turn token (tests/driver/test_beliefs.py checks that part)."""
    from bs_unlearn import trainer
    from bs_unlearn.beliefs import prompt_ids_of

    seen = []
    real = trainer.sample_beliefs

    def recording(model, tokenizer, prompts, *, answer_labels=None, **kwargs):
        seen.append((prompts[0], list(answer_labels)))
        return real(model, tokenizer, prompts, answer_labels=answer_labels, **kwargs)

    monkeypatch.setattr(trainer, "sample_beliefs", recording)
    unlearn(_tiny_unlearn_config(tiny_setup, "bs-s", beliefs=BeliefConfig(max_new_tokens=3), max_steps=1))
    _, tokenizer = _load(tiny_setup["model"])
    first = tokenize_dataset(load_qa_jsonl(tiny_setup["forget"]), tokenizer)[0]
    assert seen == [(prompt_ids_of(first), first["labels"])]  # sampled once (off-policy), the first forget example


def test_finetune_raises_answer_logprob_and_saves(tiny_setup, tmp_path):  # noqa: F811
    output = tmp_path / "target"
    model, tokenizer = _load(tiny_setup["model"])
    before = mean_answer_logprob(model, tokenizer, tiny_setup["forget"])
    config = FinetuneConfig(
        data=[str(tiny_setup["forget"]), str(tiny_setup["retain"])],
        model=str(tiny_setup["model"]),
        output=str(output),
        max_steps=6,
        batch_size=8,
        lr=1e-2,
        progress=False,
    )
    result = finetune(config)
    reloaded, reloaded_tokenizer = _load(output)
    after = mean_answer_logprob(reloaded, reloaded_tokenizer, tiny_setup["forget"])
    assert after > before + 0.5
    record = json.loads((output / "run.json").read_text())
    assert record["command"] == "finetune" and record["config"]["lr"] == 1e-2
    assert [e["loss"] for e in record["log_history"] if "loss" in e] == [
        e["loss"] for e in result.log_history if "loss" in e
    ]
    assert not list(tmp_path.glob(".*partial*"))
    assert is_own_output(output)  # marked: a later --overwrite may replace it


def test_gradient_accumulation_matches_larger_batch(tiny_setup):  # noqa: F811
    def losses(batch_size, grad_accum):
        config = UnlearnConfig(
            objective=ObjectiveConfig(method="graddiff"),
            forget=str(tiny_setup["forget"]),
            retain=str(tiny_setup["retain"]),
            model=str(tiny_setup["model"]),
            max_steps=3,
            batch_size=batch_size,
            grad_accum=grad_accum,
            lr=5e-3,
            progress=False,
        )
        return [entry["loss"] for entry in unlearn(config).log_history if "loss" in entry]

    torch.testing.assert_close(losses(2, 2), losses(4, 1), atol=1e-5, rtol=1e-5)


def test_callbacks_receive_the_model_and_interrupt_leaves_no_output(tiny_setup, tmp_path):  # noqa: F811
    class Interrupt(TrainerCallback):
        seen_model = None

        def on_step_end(self, args, state, control, model=None, **kwargs):
            Interrupt.seen_model = model
            if state.global_step == 2:
                raise KeyboardInterrupt

    previous = tmp_path / "run"
    previous.mkdir()
    mark_output_dir(previous)  # an earlier bs-unlearn output, which --overwrite may replace
    (previous / "marker").write_text("previous run")
    config = UnlearnConfig(
        objective=ObjectiveConfig(method="ga"),
        forget=str(tiny_setup["forget"]),
        model=str(tiny_setup["model"]),
        output=str(previous),
        overwrite=True,
        max_steps=4,
        progress=False,
    )
    with pytest.raises(KeyboardInterrupt):
        unlearn(config, callbacks=[Interrupt()])
    assert Interrupt.seen_model is not None
    # The previous complete directory is untouched and no partial directory is left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert (previous / "marker").read_text() == "previous run"

    fresh = tmp_path / "fresh"
    config.output, config.overwrite = str(fresh), False
    with pytest.raises(KeyboardInterrupt):
        unlearn(config, callbacks=[Interrupt()])
    assert not fresh.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_overwrite_replaces_a_previous_run(tiny_setup, tmp_path):  # noqa: F811
    output = tmp_path / "run"
    output.mkdir()
    mark_output_dir(output)  # written by bs-unlearn before (tests/driver/test_cli_hardening.py: any other is kept)
    (output / "marker").write_text("old")
    config = UnlearnConfig(
        objective=ObjectiveConfig(method="ga"),
        forget=str(tiny_setup["forget"]),
        model=str(tiny_setup["model"]),
        output=str(output),
        max_steps=1,
        progress=False,
    )
    with pytest.raises(ValueError, match="already exists"):
        unlearn(config)
    config.overwrite = True
    unlearn(config)
    assert not (output / "marker").exists() and (output / "run.json").is_file() and (output / "config.json").is_file()
    assert is_own_output(output)  # and so replaceable again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


class _GradientsBeforeTheStep(TrainerCallback):
    """Keeps a copy of every gradient at the first optimizer step."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not self.grads:
            self.grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["finetune", "unlearn"])
def test_training_step_fused_by_default_equals_materialised(tiny_setup, kind):  # noqa: F811
    """The fused lm_head loss is the default; one training step's loss and gradients equal the materialised path's
    within the float32 tolerance; the step timer splits the step into its phases."""
    from bs_unlearn.step_timing import PHASES, StepTimer
    from conftest import TOLERANCES

    runs = {}
    for fused in (True, False):
        model, tokenizer = _load(tiny_setup["model"])
        common = dict(model=str(tiny_setup["model"]), max_steps=1, batch_size=4, lr=1e-3, progress=False)
        if kind == "finetune":
            config = FinetuneConfig(data=[str(tiny_setup["forget"])], **common)
        else:
            config = UnlearnConfig(
                objective=ObjectiveConfig(method="graddiff"),
                forget=str(tiny_setup["forget"]),
                retain=str(tiny_setup["retain"]),
                **common,
            )
        assert config.fused_linear  # the default
        config.fused_linear = fused
        gradients, timer = _GradientsBeforeTheStep(), StepTimer()
        run = (finetune if kind == "finetune" else unlearn)(
            config, model=model, tokenizer=tokenizer, callbacks=[timer, gradients]
        )
        assert run.summary["fused_linear"] is fused
        loss = next(entry["loss"] for entry in run.log_history if "loss" in entry)
        runs[fused] = (loss, gradients.grads, timer.to_dict())
    (fused_loss, fused_grads, timing), (loss, grads, _) = runs[True], runs[False]
    tolerance = TOLERANCES[torch.float32]
    assert fused_loss == pytest.approx(loss, abs=tolerance["atol"], rel=tolerance["rtol"])
    assert fused_grads.keys() == grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, **tolerance, msg=name)
    assert timing["steps"] == 1
    assert all(timing["seconds"][phase] > 0 for phase in PHASES if phase != "probe")


def test_release_training_state_frees_the_optimizer_and_reference(tiny_setup):  # noqa: F811
    """What the pipeline keeps of a finished run is its model: the optimizer (with its state), the schedule and the
    frozen reference model are gone once released, not when a garbage collection happens to run."""
    import weakref

    from bs_unlearn.trainer import release_training_state

    result = unlearn(_tiny_unlearn_config(tiny_setup, "npo", max_steps=2))
    trainer = result.trainer
    held = [weakref.ref(obj) for obj in (trainer.optimizer, trainer.lr_scheduler, trainer.ref_model)]
    del trainer
    release_training_state(result)
    assert result.trainer is None and all(ref() is None for ref in held)
    assert isinstance(result.model, torch.nn.Module)
