"""The open-unlearning drop-ins' argument errors name the caller's argument; empty forget batches warn once."""

from __future__ import annotations

import warnings

import pytest
import torch
from bs_unlearn.integrations.open_unlearning import BSS, BST
from integration_fixtures import make_batch, tiny_model_and_tokenizer, training_arguments


@pytest.mark.parametrize(
    "trainer_class, arguments, name",
    [
        (BST, dict(lambda_bst=1.5), "lambda_bst"),
        (BST, dict(lambda_bst="0.2"), "lambda_bst"),
        (BST, dict(top_k=0), "top_k"),
        (BST, dict(top_k=2.5), "top_k"),
        (BST, dict(detach_mode=True), "detach_mode"),  # YAML's bare yes
        (BST, dict(bst_mode="sequence"), "bst_mode"),
        (BST, dict(retain_loss_type="kl"), "retain_loss_type"),
        (BST, dict(impl="cuda"), "impl"),
        (BSS, dict(lambda_bss=-0.1), "lambda_bss"),
        (BSS, dict(n_samples=0), "n_samples"),
        (BSS, dict(regeneration_epochs=True), "regeneration_epochs"),
        (BSS, dict(lambda_bst=2.0), "lambda_bst"),
    ],
)
def test_bad_arguments_name_the_callers_argument(tmp_path, trainer_class, arguments, name):
    model, _ = tiny_model_and_tokenizer()
    with pytest.raises(ValueError) as info:
        trainer_class(**arguments, model=model, args=training_arguments(tmp_path))
    message = str(info.value)
    assert message.startswith(name) or f"{name}=" in message or f"{name} " in message, message
    assert "lam " not in message and "lam must" not in message  # not the kernel's own name for lambda_bst


def test_forget_batch_without_answer_tokens_warns_once(tmp_path):
    model, tokenizer = tiny_model_and_tokenizer()
    trainer = BST(lambda_bst=0.2, top_k=5, model=model, args=training_arguments(tmp_path))
    batch = make_batch(tokenizer)
    empty = dict(batch, forget=dict(batch["forget"], labels=torch.full_like(batch["forget"]["labels"], -100)))
    with pytest.warns(RuntimeWarning, match="no answer token"):
        loss = trainer.compute_loss(model, empty)
    assert torch.isfinite(loss)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer.compute_loss(model, empty)  # warned once: no second warning
        trainer.compute_loss(model, batch)
