"""Drop-in trainers for open-unlearning (bs_unlearn.integrations): same loss values and gradients as the method
authors' formulas over materialised logits, belief sets for BSS, real Trainer steps, PEFT/LoRA."""

from __future__ import annotations

import copy

import pytest
import torch
from bs_unlearn.integrations.open_unlearning import (
    BSS,
    BST,
    FusedLossMixin,
    GradDiffOnTrainer,
    fused_trainer,
    register,
)
from bs_unlearn.objectives import model_terms as fused
from conftest import TOLERANCES
from integration_fixtures import (
    authors_bst_forget_loss,
    authors_ga_term,
    authors_retain_loss,
    make_batch,
    make_dataset,
    parameter_grads,
    tiny_model_and_tokenizer,
    training_arguments,
)

# float64 models: the fused and the materialised computations then agree to rounding, so a wrong term cannot hide.
ATOL, RTOL = 1e-10, 1e-9


def assert_same_grads(expected: dict, actual: dict) -> None:
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=ATOL, rtol=RTOL, msg=name)


@pytest.mark.parametrize("detach_mode", ["yes", "no"])
@pytest.mark.parametrize("retain_loss_type", ["NLL", "KL"])
def test_bst_matches_the_authors_formula(tmp_path, detach_mode, retain_loss_type):
    model, tokenizer = tiny_model_and_tokenizer()
    reference_model = copy.deepcopy(model)
    method = dict(lambda_bst=0.3, detach_mode=detach_mode, top_k=5)
    trainer = BST(
        **method,
        gamma=0.7,
        alpha=1.3,
        retain_loss_type=retain_loss_type,
        model=model,
        args=training_arguments(tmp_path),
        processing_class=tokenizer,
    )
    batch = make_batch(tokenizer)

    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    frozen = trainer.ref_model if retain_loss_type == "KL" else None
    expected = 0.7 * authors_bst_forget_loss(reference_model, batch["forget"], **method)
    expected = expected + 1.3 * authors_retain_loss(reference_model, frozen, batch["retain"], retain_loss_type)
    expected.backward()

    torch.testing.assert_close(loss, expected, atol=ATOL, rtol=RTOL)
    assert_same_grads(parameter_grads(reference_model), parameter_grads(model))
    # The fused path really ran: the causal LM carries the bs_kernels patch.
    assert fused.fused_model(model)


def test_detach_mode_changes_the_gradient(tmp_path):
    """The two detach modes must give different gradients (else the test above could not tell them apart)."""
    grads = {}
    for mode in ("yes", "no"):
        model, tokenizer = tiny_model_and_tokenizer()
        trainer = BST(lambda_bst=0.5, detach_mode=mode, top_k=5, model=model, args=training_arguments(tmp_path))
        trainer.compute_loss(model, make_batch(tokenizer)).backward()
        grads[mode] = model.lm_head.weight.grad
    assert (grads["yes"] - grads["no"]).abs().max() > 1e-6


def test_fused_mixin_keeps_graddiff_values(tmp_path):
    """fused_trainer(GradDiff): same loss and gradients as the stock GradDiff (forget and NLL retain fused).

    float32: the stock trainer uses the model's own loss, which transformers computes in float32 whatever the model.
    """
    model, tokenizer = tiny_model_and_tokenizer(dtype=torch.float32)
    stock_model = copy.deepcopy(model)
    batch = make_batch(tokenizer)
    fused_class = fused_trainer(GradDiffOnTrainer)
    assert fused_class.__name__ == "FusedGradDiffOnTrainer" and issubclass(fused_class, FusedLossMixin)
    fused_loss = fused_class(gamma=0.5, alpha=2.0, model=model, args=training_arguments(tmp_path)).compute_loss(
        model, batch
    )
    stock_loss = GradDiffOnTrainer(gamma=0.5, alpha=2.0, model=stock_model, args=training_arguments(tmp_path))
    stock_loss = stock_loss.compute_loss(stock_model, batch)
    fused_loss.backward()
    stock_loss.backward()
    torch.testing.assert_close(fused_loss, stock_loss, **TOLERANCES[torch.float32])
    stock_grads, fused_grads = parameter_grads(stock_model), parameter_grads(model)
    assert stock_grads.keys() == fused_grads.keys()
    for name in stock_grads:
        torch.testing.assert_close(fused_grads[name], stock_grads[name], **TOLERANCES[torch.float32], msg=name)
    # Outside compute_loss the model is the stock one again: labelled calls return logits and the HF loss.
    output = model(**{key: batch["retain"][key] for key in ("input_ids", "attention_mask", "labels")})
    assert output.logits is not None and output.loss > 0
    with pytest.raises(ValueError, match="KL"):
        fused_class(retain_loss_type="KL", model=model, args=training_arguments(tmp_path))


def test_bss_samples_the_whole_forget_set_and_mixes_the_loss(tmp_path):
    model, tokenizer = tiny_model_and_tokenizer()
    reference_model = copy.deepcopy(model)
    dataset = make_dataset(tokenizer, num_forget=4)
    trainer = BSS(
        lambda_bss=0.4,
        n_samples=2,
        temperature=1.0,
        regeneration_epochs=2,
        max_new_tokens=4,
        gamma=1.0,
        alpha=0.5,
        model=model,
        args=training_arguments(tmp_path),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.refresh_beliefs_for_epoch(0, model)
    assert trainer.sampled_at_epochs == [0]
    assert len(trainer.beliefs) == 4
    for prompt, beliefs in trainer.beliefs.items():
        assert len(beliefs) == 2
        for belief in beliefs:
            assert tuple(belief["input_ids"][: len(prompt)]) == prompt
            assert belief["labels"][: len(prompt)] == [-100] * len(prompt)
            assert 1 <= len(belief["input_ids"]) - len(prompt) <= 4
    first_set = copy.deepcopy(trainer.beliefs)
    trainer.refresh_beliefs_for_epoch(1, model)  # not due: 1 % 2 != 0
    assert trainer.sampled_at_epochs == [0] and trainer.beliefs == first_set
    trainer.refresh_beliefs_for_epoch(2, model)  # due: the whole set is resampled
    assert trainer.sampled_at_epochs == [0, 2] and trainer.beliefs.keys() == first_set.keys()

    batch = make_batch(tokenizer, forget_indices=(0, 1, 3))
    belief_batch = trainer.belief_batch(model, batch["forget"])
    assert belief_batch["input_ids"].shape[0] == 3 * 2
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    forget_term = 0.6 * authors_ga_term(reference_model, batch["forget"]) + 0.4 * authors_ga_term(
        reference_model, belief_batch
    )
    expected = forget_term + 0.5 * authors_retain_loss(reference_model, None, batch["retain"], "NLL")
    expected.backward()
    torch.testing.assert_close(loss, expected, atol=ATOL, rtol=RTOL)
    assert_same_grads(parameter_grads(reference_model), parameter_grads(model))


def test_bss_passes_a_forget_answer_to_end_beliefs_like(tmp_path, monkeypatch):
    """The belief set and on-demand beliefs are sampled with a forget example's labels as answer_labels (the driver
    does the same; tests/driver/test_beliefs.py checks what sample_beliefs makes of them)."""
    from bs_unlearn.integrations import open_unlearning

    calls = []
    real = open_unlearning.sample_beliefs

    def recording(*args, answer_labels=None, **kwargs):
        calls.append(list(torch.as_tensor(answer_labels).tolist()))
        return real(*args, answer_labels=answer_labels, **kwargs)

    monkeypatch.setattr(open_unlearning, "sample_beliefs", recording)
    model, tokenizer = tiny_model_and_tokenizer()
    dataset = make_dataset(tokenizer, num_forget=2)
    arguments = dict(n_samples=1, max_new_tokens=3, model=model, args=training_arguments(tmp_path))
    trainer = BSS(train_dataset=dataset, processing_class=tokenizer, **arguments)
    trainer.refresh_beliefs_for_epoch(0, model)
    assert calls == [list(dataset.forget[0]["labels"])]
    on_demand = BSS(processing_class=tokenizer, **arguments)
    batch = make_batch(tokenizer)["forget"]
    on_demand.belief_batch(model, batch)
    assert calls[1] == batch["labels"][0].tolist()


def test_bss_with_bst_base_and_on_demand_beliefs(tmp_path):
    """bss_base="BST": both terms are BS-T; a prompt outside the data set is sampled on first use."""
    model, tokenizer = tiny_model_and_tokenizer()
    reference_model = copy.deepcopy(model)
    trainer = BSS(
        lambda_bss=0.5,
        n_samples=1,
        regeneration_epochs=0,
        bss_base="BST",
        lambda_bst=0.3,
        top_k=4,
        max_new_tokens=3,
        alpha=0.0,
        model=model,
        args=training_arguments(tmp_path),
        processing_class=tokenizer,
    )
    batch = {"forget": make_batch(tokenizer)["forget"]}
    loss = trainer.compute_loss(model, batch)
    assert len(trainer.beliefs) == 3
    belief_batch = trainer.belief_batch(model, batch["forget"])
    method = dict(lambda_bst=0.3, top_k=4, detach_mode="yes")
    expected = 0.5 * authors_bst_forget_loss(reference_model, batch["forget"], **method)
    expected = expected + 0.5 * authors_bst_forget_loss(reference_model, belief_batch, **method)
    torch.testing.assert_close(loss, expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("trainer_class", [BST, BSS])
def test_one_optimisation_step_through_trainer(tmp_path, trainer_class):
    model, tokenizer = tiny_model_and_tokenizer(dtype=torch.float32)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    extra = dict(n_samples=2, max_new_tokens=4) if trainer_class is BSS else {}
    from bs_unlearn.data import ForgetRetainCollator

    trainer = trainer_class(
        **extra,
        model=model,
        args=training_arguments(tmp_path),
        train_dataset=make_dataset(tokenizer),
        data_collator=ForgetRetainCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
    )
    trainer.train()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert trainer.state.global_step == 1 and len(logged) == 1 and torch.isfinite(torch.tensor(logged[0]))
    changed = [name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])]
    assert "lm_head.weight" in changed and len(changed) == len(before)
    if trainer_class is BSS:
        assert trainer.sampled_at_epochs == [0] and len(trainer.beliefs) == 4


def test_bad_arguments_name_the_argument(tmp_path):
    model, _ = tiny_model_and_tokenizer()
    args = training_arguments(tmp_path)
    with pytest.raises(ValueError, match="detach_mode"):
        BST(detach_mode="maybe", model=model, args=args)
    with pytest.raises(ValueError, match="bst_mode"):
        BST(bst_mode="sequence", model=model, args=args)
    with pytest.raises(ValueError, match="retain_loss_type"):
        BST(retain_loss_type="MSE", model=model, args=args)
    with pytest.raises(ValueError, match="lam"):
        BST(lambda_bst=1.5, model=model, args=args)
    with pytest.raises(ValueError, match="lambda_bss"):
        BSS(lambda_bss=-0.1, model=model, args=args)
    with pytest.raises(ValueError, match="n_samples"):
        BSS(n_samples=0, model=model, args=args)
    with pytest.raises(ValueError, match="bss_base"):
        BSS(bss_base="NPO", model=model, args=args)


def test_register_adds_both_trainers():
    registry = register({})
    assert registry == {"BST": BST, "BSS": BSS}


def test_plain_loop_terms_match_materialised_logits():
    """The recipe functions (fused.py) give the stock values, per token and reduced."""
    model, tokenizer = tiny_model_and_tokenizer()
    batch = make_batch(tokenizer)["forget"]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shift_labels = batch["labels"][:, 1:]
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
    expected = logprobs.gather(-1, shift_labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (shift_labels != -100)
    torch.testing.assert_close(fused.answer_token_logprobs(model, batch), expected, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(fused.answer_logprob_loss(model, batch), authors_ga_term(model, batch))
    method = dict(lambda_bst=0.2, top_k=20, detach_mode="yes")
    torch.testing.assert_close(
        fused.bs_t_forget_loss(model, batch, lam=0.2, top_k=20),
        authors_bst_forget_loss(model, batch, **method),
        atol=ATOL,
        rtol=RTOL,
    )


def test_lora_with_gradient_checkpointing(tmp_path):
    """A LoRA-wrapped model (frozen lm_head, gradient checkpointing, enable_input_require_grads): the fused BST
    loss and the LoRA gradients equal the authors' formula; one Trainer step updates only the adapters."""
    peft = pytest.importorskip("peft")

    def lora_model():
        model, tokenizer = tiny_model_and_tokenizer()
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        torch.manual_seed(1)
        wrapped = peft.get_peft_model(model, config)
        for name, parameter in wrapped.named_parameters():  # LoRA's B starts at 0; make the adapters matter
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.1)
        return wrapped, tokenizer

    model, tokenizer = lora_model()
    reference_model = copy.deepcopy(model)
    assert not model.get_base_model().lm_head.weight.requires_grad
    batch = make_batch(tokenizer)
    trainer = BST(lambda_bst=0.3, top_k=5, model=model, args=training_arguments(tmp_path))
    model.train()
    reference_model.train()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    expected = authors_bst_forget_loss(reference_model, batch["forget"], lambda_bst=0.3, top_k=5, detach_mode="yes")
    expected = expected + authors_retain_loss(reference_model, None, batch["retain"], "NLL")
    expected.backward()
    torch.testing.assert_close(loss, expected, atol=ATOL, rtol=RTOL)
    grads = parameter_grads(model)
    assert grads and all("lora_" in name for name in grads)
    assert_same_grads(parameter_grads(reference_model), grads)

    from bs_unlearn.data import ForgetRetainCollator

    model, tokenizer = lora_model()
    model = model.float()
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainer = BST(
        model=model,
        args=training_arguments(tmp_path, activation_checkpointing=True),
        train_dataset=make_dataset(tokenizer),
        data_collator=ForgetRetainCollator(tokenizer.pad_token_id),
    )
    trainer.train()
    assert trainer.state.global_step == 1
    assert all(torch.equal(p.detach(), frozen_before[n]) for n, p in model.named_parameters() if not p.requires_grad)


@pytest.mark.parametrize("name, trainer_class", [("BST.yaml", BST), ("BSS.yaml", BSS)])
def test_shipped_trainer_configs_construct_their_trainer(tmp_path, name, trainer_class):
    """The example open-unlearning YAML: handler names the class, method_args are accepted as they are."""
    import pathlib

    import bs_unlearn.integrations
    import yaml

    configs = pathlib.Path(bs_unlearn.integrations.__file__).parent / "configs" / "trainer"
    config = yaml.safe_load((configs / name).read_text())
    assert config["handler"] == trainer_class.__name__
    model, tokenizer = tiny_model_and_tokenizer()
    trainer = trainer_class(**config["method_args"], model=model, args=training_arguments(tmp_path))
    assert trainer.detach_mode == "yes" and trainer.lambda_bst == config["method_args"]["lambda_bst"]


def test_refused_architecture_falls_back_to_logits():
    """A model the patch refuses (here: a model_type outside its list) takes the materialised path, same values."""
    model, tokenizer = tiny_model_and_tokenizer()
    model.config.model_type = "not-a-supported-type"
    batch = make_batch(tokenizer)["forget"]
    assert not fused.fused_model(model)
    assert "forward" not in model.__dict__  # not patched
    method = dict(lambda_bst=0.3, top_k=5, detach_mode="no")
    torch.testing.assert_close(
        fused.bs_t_forget_loss(model, batch, lam=0.3, top_k=5, detach_belief=False),
        authors_bst_forget_loss(model, batch, **method),
        atol=ATOL,
        rtol=RTOL,
    )
    torch.testing.assert_close(fused.answer_logprob_loss(model, batch), authors_ga_term(model, batch))


FAKE_OPEN_UNLEARNING = {
    # A stand-in for open-unlearning's src/trainer (same names and signatures, not its code): the registry with
    # _register_trainer, and GradDiff(gamma, alpha, retain_loss_type, *args, evaluators, template_args, **kwargs).
    "trainer/__init__.py": (
        "TRAINER_REGISTRY = {}\n"
        "def _register_trainer(trainer_class):\n"
        "    TRAINER_REGISTRY[trainer_class.__name__] = trainer_class\n"
    ),
    "trainer/unlearn/__init__.py": "",
    "trainer/unlearn/grad_diff.py": (
        "from transformers import Trainer\n"
        "class GradDiff(Trainer):\n"
        "    def __init__(self, gamma=1.0, alpha=1.0, retain_loss_type='NLL', *args, evaluators=None,\n"
        "                 template_args=None, **kwargs):\n"
        "        super().__init__(*args, **kwargs)\n"
        "        self.gamma, self.alpha, self.retain_loss_type = gamma, alpha, retain_loss_type\n"
        "        self.evaluators, self.template_args, self.ref_model = evaluators, template_args, None\n"
    ),
}

REGISTRATION_SCRIPT = """
import sys, tempfile, torch
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[2])
from trainer import TRAINER_REGISTRY, _register_trainer
from trainer.unlearn.grad_diff import GradDiff
# the two lines a user adds to open-unlearning's src/trainer/__init__.py:
from bs_unlearn.integrations.open_unlearning import BSS, BST
_register_trainer(BST); _register_trainer(BSS)
from bs_unlearn.integrations import open_unlearning
from integration_fixtures import make_batch, tiny_model_and_tokenizer, training_arguments
assert open_unlearning.OPEN_UNLEARNING_AVAILABLE and BST.__mro__[1] is GradDiff, BST.__mro__
model, tokenizer = tiny_model_and_tokenizer()
# open-unlearning's load_trainer: handler name -> class, method_args + its own keyword arguments
trainer = TRAINER_REGISTRY["BST"](
    model=model, args=training_arguments(tempfile.mkdtemp()), evaluators=None, template_args={},
    lambda_bst=0.2, top_k=20, gamma=1.0, alpha=1.0, retain_loss_type="NLL",
)
loss = trainer.compute_loss(model, make_batch(tokenizer))
assert torch.isfinite(loss), loss
print("REGISTERED", sorted(TRAINER_REGISTRY))
"""


def test_registration_in_an_open_unlearning_tree(tmp_path):
    """With open-unlearning's ``trainer`` package importable, BST/BSS subclass its GradDiff and register by name."""
    import pathlib
    import subprocess
    import sys

    for relative, text in FAKE_OPEN_UNLEARNING.items():
        path = tmp_path / "src" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    tests_dir = pathlib.Path(__file__).resolve().parent
    completed = subprocess.run(
        [sys.executable, "-c", REGISTRATION_SCRIPT, str(tmp_path / "src"), str(tests_dir)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "REGISTERED ['BSS', 'BST']" in completed.stdout
