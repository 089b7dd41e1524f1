"""Shared pieces of the integration tests: tiny batches, Trainer arguments, and the authors' BST formula.

The authors' formula is transcribed here from the method authors' open-unlearning fork (trainer ``BST``, on top of
``GradDiff``) over materialised logits, so the drop-in trainers are checked against it rather than against
bs_kernels itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from bs_unlearn.data import pad_examples, tokenize_qa
from driver_fixtures import NUM_ITEMS, build_model, build_tokenizer, qa_rows
from transformers import TrainingArguments

IGNORE_INDEX = -100


def tokenized(tokenizer, indices) -> list[dict]:
    return [tokenize_qa(tokenizer, row["question"], row["answer"]) for row in qa_rows(indices)]


class PairedDataset(torch.utils.data.Dataset):
    """Like open-unlearning's ForgetRetainDataset (``.forget``, ``.retain``, items ``{"forget", "retain"}``), with a
    fixed retain partner per forget example, so runs with different process counts see identical batches."""

    def __init__(self, forget: list[dict], retain: list[dict]) -> None:
        self.forget, self.retain = forget, retain

    def __len__(self) -> int:
        return len(self.forget)

    def __getitem__(self, index: int) -> dict:
        return {"forget": self.forget[index], "retain": self.retain[index % len(self.retain)]}


def make_dataset(tokenizer, num_forget: int = 4) -> PairedDataset:
    """Forget items 0..num_forget-1, each paired with retain item 8 + its index."""
    return PairedDataset(tokenized(tokenizer, range(num_forget)), tokenized(tokenizer, range(8, NUM_ITEMS)))


def make_batch(tokenizer, forget_indices=(0, 1, 2), retain_indices=(9, 10, 11)) -> dict:
    """One {"forget", "retain"} batch, right-padded; the forget answers get uneven lengths by cutting one answer."""
    forget = tokenized(tokenizer, forget_indices)
    forget[0] = {key: value[:-2] for key, value in forget[0].items()}  # a shorter sequence: padding and masks matter
    return {
        "forget": pad_examples(forget, tokenizer.pad_token_id),
        "retain": pad_examples(tokenized(tokenizer, retain_indices), tokenizer.pad_token_id),
    }


def training_arguments(folder, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(folder),
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_steps=1,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        optim="adamw_torch",
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def tiny_model_and_tokenizer(seed: int = 0, dtype=torch.float64):
    tokenizer = build_tokenizer()
    return build_model(tokenizer, seed=seed).to(dtype), tokenizer


def _forward_inputs(batch):
    return {key: batch[key] for key in ("input_ids", "attention_mask", "labels")}


def authors_bst_forget_loss(model, forget_inputs, *, lambda_bst, top_k, detach_mode) -> torch.Tensor:
    """The authors' BST forget loss over materialised logits (transcribed, not from bs_kernels)."""
    logits = model(**_forward_inputs(forget_inputs)).logits
    shift_logits = logits[..., :-1, :].contiguous()
    shift_labels = forget_inputs["labels"][..., 1:].contiguous()
    vocab_size = shift_logits.shape[-1]
    topk_values, topk_ids = shift_logits.topk(top_k, dim=-1)
    belief = F.softmax(topk_values, dim=-1)
    if detach_mode == "yes":
        belief = belief.detach()
    soft_target = torch.zeros_like(shift_logits).scatter(-1, topk_ids, lambda_bst * belief)
    valid = shift_labels != IGNORE_INDEX
    one_hot = F.one_hot(shift_labels.clamp(min=0), vocab_size).to(shift_logits.dtype) * valid.unsqueeze(-1)
    soft_target = soft_target + (1.0 - lambda_bst) * one_hot
    token_loss = -(soft_target * F.log_softmax(shift_logits, dim=-1)).sum(-1)
    per_sequence = (token_loss * valid).sum(-1) / valid.sum(-1)
    return -per_sequence.mean()


def stock_nll(model, batch) -> torch.Tensor:
    """What ``model(**batch).loss`` computes: the mean cross-entropy over the valid shifted labels.

    Written out because transformers computes its own loss after ``logits.float()``, so for the float64 models used
    here the stock value carries float32 rounding (~1e-7) that the formula itself does not have.
    """
    logits = model(**{key: value for key, value in _forward_inputs(batch).items() if key != "labels"}).logits
    shift_logits = logits[..., :-1, :].reshape(-1, logits.shape[-1])
    return F.cross_entropy(shift_logits, batch["labels"][..., 1:].reshape(-1), ignore_index=IGNORE_INDEX)


def authors_retain_loss(model, ref_model, retain_inputs, retain_loss_type) -> torch.Tensor:
    """open-unlearning's GradDiff.compute_retain_loss (NLL: the model's own loss; KL: compute_kl_divergence)."""
    inputs = _forward_inputs(retain_inputs)
    if retain_loss_type == "NLL":
        return stock_nll(model, inputs)
    with torch.no_grad():
        ref_logits = ref_model(**inputs).logits
    ref_logprobs = F.log_softmax(ref_logits, dim=-1).view(-1, ref_logits.shape[-1])
    logits = model(**inputs).logits
    logprobs = F.log_softmax(logits, dim=-1).view(-1, logits.shape[-1])
    return F.kl_div(logprobs, ref_logprobs, reduction="batchmean", log_target=True)


def authors_ga_term(model, batch) -> torch.Tensor:
    """open-unlearning's gradient-ascent forget term: -model(**batch).loss."""
    return -stock_nll(model, batch)


def parameter_grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
