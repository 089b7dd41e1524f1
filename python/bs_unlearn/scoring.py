"""Model-facing teacher-forced scorers: (question, answer) pairs -> per-sequence numbers.

The layer between the data (``data``: prompts, tokenisation, padding) and the metrics (``metrics``: pure functions
and whole evaluations); generation (``generation``) sits beside it and shares its helpers (the device, the pad and
stop ids, the attention mask). Everything here runs the model under ``no_grad`` in eval mode and restores the mode
after.

- :func:`score_encodings` / :func:`score_answers` / :func:`score_qa`: mean per-token log p(answer | prompt), one
  batch at a time; optionally the token-level squeezing view (p(label) and the mass on the top-k other tokens) and,
  for Exact Memorization / Extraction Strength, whether each answer position's teacher-forced argmax is its label.
  By default one fused ``bs_linear_loss`` pass from the last hidden state and the lm_head weight gives all of them
  (no [B, T, V] logits) wherever ``bs_kernels.patch_causal_lm`` supports the model; otherwise (or ``fused=False``)
  the batch's logits are materialised and scored with ``forget_logprobs`` and the fused BS-T pass's top-k. The same
  values either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from bs_kernels import IGNORE_INDEX, bs_token_loss, forget_logprobs

from .data import end_of_turn_ids, pad_examples, tokenize_qa
from .fused import fused_supported
from .prompts import PromptFormat, encode_qa

__all__ = [
    "SequenceScores",
    "alt_mass_view",
    "argmax_matches",
    "mean_token_logprobs",
    "model_device",
    "pad_token_id",
    "score_answers",
    "score_encodings",
    "score_qa",
    "stop_token_ids",
]


# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's (first) parameter."""
    return next(model.parameters()).device


def pad_token_id(tokenizer) -> int:
    """The id used to pad batches: the tokenizer's pad token, else its eos token, else 0 (padding is masked)."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    return 0


def stop_token_ids(tokenizer, model: torch.nn.Module) -> list[int]:
    """The tokenizer's eos / end-of-turn ids plus the model's generation-config eos (never a hard-coded string)."""
    ids = set(end_of_turn_ids(tokenizer))
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(config_eos, int):
        ids.add(config_eos)
    elif config_eos:
        ids.update(int(i) for i in config_eos)
    return sorted(ids)


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


def alt_mass_view(logits: torch.Tensor, labels: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """p(label) and the probability of the top_k most likely tokens other than the label, per (shifted) position.

    logits [B, T, V], labels [B, T] (IGNORE_INDEX = ignored): returns two [B, T-1] float32 tensors (0 where ignored).
    Only top_k + 1 values per position are kept besides the batch's logits: the label is in the top k + 1 or not,
    and the k most likely others are the first k of the top k + 1 after removing it.
    """
    shifted_logits = logits[:, :-1].float()
    shifted_labels = labels[:, 1:]
    valid = shifted_labels != IGNORE_INDEX
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


def argmax_matches(logits: torch.Tensor, labels: torch.Tensor, *, top_k: int = 1, impl: str = "auto") -> torch.Tensor:
    """[B, T-1] bool: the teacher-forced argmax at each (shifted) position equals its label (False where ignored).

    The argmax comes from the fused BS-T pass (``bs_token_loss(..., return_stats=True)``), whose top-k already holds
    it: among ``stats.belief_ids`` (in no particular order) it is the id with the largest belief probability. No
    [B, T, V] softmax or argmax is materialised besides the logits themselves.
    """
    _, stats = bs_token_loss(logits, labels, lam=0.0, top_k=top_k, reduction="none", return_stats=True, impl=impl)
    best = stats.belief_probs.argmax(dim=-1, keepdim=True)
    argmax_ids = stats.belief_ids.gather(-1, best).squeeze(-1)
    shifted_labels = labels[:, 1:]
    return (argmax_ids == shifted_labels) & (shifted_labels != IGNORE_INDEX)


# --------------------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------------------


@dataclass
class SequenceScores:
    """Per-sequence results of :func:`score_encodings` (numpy arrays, one entry per input sequence)."""

    mean_logprob: np.ndarray  # [N] mean per-token log p(answer token)
    num_tokens: np.ndarray  # [N] scored answer tokens
    p_label: np.ndarray | None = None  # [N] mean over answer positions of p(label)
    alt_mass: np.ndarray | None = None  # [N] mean over positions of the mass on the top-k tokens other than the label
    # Per sequence, bool [T_i]: teacher-forced argmax == label at each answer position, a final stop token excluded
    # (the input of metrics.exact_memorization / metrics.extraction_strength).
    argmax_match: list[np.ndarray] | None = None


@torch.no_grad()
def score_encodings(
    model: torch.nn.Module,
    tokenizer,
    encodings: Sequence[dict],
    *,
    batch_size: int = 16,
    token_view_top_k: int | None = None,
    memorization: bool = False,
    impl: str = "auto",
    fused: bool = True,
) -> SequenceScores:
    """Mean per-token log p(answer | prompt) per sequence, by default without the [B, T, V] logits.

    Args:
        encodings: ``data.tokenize_qa`` outputs: ``input_ids`` (prompt + answer) and ``labels`` (IGNORE_INDEX on the
            prompt).
        batch_size: sequences per forward pass; only that batch's logits [batch_size, T, V] are alive at a time.
        token_view_top_k: also return, averaged over answer positions, p(label) and the mass on the k most likely
            other tokens (the token-level view of the squeezing effect).
        memorization: also return ``argmax_match``: per sequence, whether each answer position's teacher-forced
            argmax is its label (:func:`argmax_matches`, the same forward pass). As open-unlearning does ("ignore eos
            prediction"), the answer's last position is left out when its label is a stop token
            (:func:`stop_token_ids`): an answer of T content tokens plus end-of-turn gives T values.
        fused: one ``bs_linear_loss`` pass from the last hidden state and the lm_head weight (:func:`_fused_views`)
            wherever ``bs_kernels.patch_causal_lm`` supports the model; False (or an unsupported model): the
            materialised logits with ``forget_logprobs`` (:func:`_materialised_views`). The same values either way.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not encodings:
        return SequenceScores(np.zeros(0), np.zeros(0, dtype=np.int64), argmax_match=[] if memorization else None)
    was_training = model.training
    model.eval()
    device = model_device(model)
    stops = set(stop_token_ids(tokenizer, model)) if memorization else set()
    # Sorting by length keeps padding (and wasted compute) small; results are put back in input order.
    order = sorted(range(len(encodings)), key=lambda i: len(encodings[i]["input_ids"]))
    mean_lp = np.zeros(len(encodings))
    counts = np.zeros(len(encodings), dtype=np.int64)
    p_label = np.zeros(len(encodings)) if token_view_top_k else None
    alt_mass = np.zeros(len(encodings)) if token_view_top_k else None
    matches: list[np.ndarray | None] | None = [None] * len(encodings) if memorization else None
    try:
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            batch = pad_examples([encodings[i] for i in index], pad_token_id(tokenizer))
            input_ids, attention_mask, labels = (
                batch[key].to(device) for key in ("input_ids", "attention_mask", "labels")
            )
            views = _batch_views(model, input_ids, attention_mask, labels, token_view_top_k, memorization, impl, fused)
            token_lp, p_lab, others, batch_matches = views
            valid = labels[:, 1:] != IGNORE_INDEX
            batch_mean = mean_token_logprobs(token_lp, valid)
            mean_lp[index] = batch_mean.double().cpu().numpy()
            counts[index] = valid.sum(-1).cpu().numpy()
            if token_view_top_k:
                n = valid.sum(-1).clamp(min=1)
                p_label[index] = (p_lab.sum(-1) / n).double().cpu().numpy()
                alt_mass[index] = (others.sum(-1) / n).double().cpu().numpy()
            if memorization:
                batch_matches = batch_matches.cpu()
                shifted_labels = labels[:, 1:].cpu()
                for row, i in enumerate(index):
                    positions = torch.nonzero(valid[row].cpu()).flatten()
                    if positions.numel() and int(shifted_labels[row, positions[-1]]) in stops:
                        positions = positions[:-1]
                    matches[i] = batch_matches[row, positions].numpy().astype(bool)
    finally:
        model.train(was_training)
    return SequenceScores(mean_lp, counts, p_label, alt_mass, matches)


def _batch_views(model, input_ids, attention_mask, labels, token_view_top_k, memorization, impl, fused):
    """One batch's [B, T-1] per-token log p(label), and (else None) p(label) / alt mass / argmax == label."""
    if fused and fused_supported(model):
        return _fused_views(model, input_ids, attention_mask, labels, token_view_top_k, memorization, impl)
    return _materialised_views(model, input_ids, attention_mask, labels, token_view_top_k, memorization, impl)


def _materialised_views(model, input_ids, attention_mask, labels, token_view_top_k, memorization, impl):
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    token_lp = forget_logprobs(logits, labels, impl=impl)  # [B, T-1], 0 where ignored
    p_lab, others = alt_mass_view(logits, labels, token_view_top_k) if token_view_top_k else (None, None)
    matches = argmax_matches(logits, labels, impl=impl) if memorization else None
    return token_lp, p_lab, others, matches


def _fused_views(model, input_ids, attention_mask, labels, token_view_top_k, memorization, impl):
    """The views of :func:`_materialised_views` from one fused pass's statistics (no [B, T, V] logits).

    The pass keeps, per position, log p(label), the ids H of the k = top_k + 1 most likely tokens and q, their
    probabilities renormalised over H. With lam = 1 its value is sum_H q_v log p_v = sum_H q_v log q_v + log S, S the
    mass of H, so S = exp(value - sum_H q log q) and p_v = S q_v: the top-(k) raw probabilities, from which
    :func:`alt_mass_view`'s sum follows exactly. The argmax is the id of the largest q (as :func:`argmax_matches`).
    """
    vocab = model.get_output_embeddings().weight.shape[0]
    top_k = min(token_view_top_k + 1, vocab) if token_view_top_k else 1
    options = dict(lam=1.0, top_k=top_k, reduction="none", return_stats=True, impl=impl)
    output = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False, bs_loss=options)
    stats = output.bs_stats
    token_lp = stats.token_logprobs
    shifted_labels = labels[:, 1:]
    valid = shifted_labels != IGNORE_INDEX
    p_lab = others = matches = None
    if token_view_top_k:
        q = stats.belief_probs.float()
        log_mass = output.loss.float() - torch.xlogy(q, q).sum(-1)  # log S per position
        top_probs = q * torch.exp(log_mass).unsqueeze(-1)
        is_label = stats.belief_ids == shifted_labels.clamp(min=0).unsqueeze(-1)
        others = top_probs.masked_fill(is_label, 0).sum(-1)
        # The label outside H: the least likely of H is one too many (H holds every token when V <= top_k).
        if top_k > token_view_top_k:
            least = top_probs.min(dim=-1).values
            others = others - torch.where(is_label.any(-1), torch.zeros_like(others), least)
        zero = torch.zeros_like(others)
        p_lab = torch.where(valid, torch.exp(token_lp.float()), zero)
        others = torch.where(valid, others, zero)
    if memorization:
        best = stats.belief_probs.argmax(dim=-1, keepdim=True)
        matches = (stats.belief_ids.gather(-1, best).squeeze(-1) == shifted_labels) & valid
    return token_lp, p_lab, others, matches


def score_answers(
    model: torch.nn.Module,
    tokenizer,
    questions: Sequence[str],
    answers: Sequence[str],
    *,
    batch_size: int = 16,
    max_length: int = 512,
    impl: str = "auto",
    prompt_format: PromptFormat | None = None,
) -> np.ndarray:
    """[N] mean per-token log p(answer_i | question_i) (:func:`score_qa`)."""
    return score_qa(
        model,
        tokenizer,
        questions,
        answers,
        batch_size=batch_size,
        max_length=max_length,
        impl=impl,
        prompt_format=prompt_format,
    ).mean_logprob


def score_qa(
    model: torch.nn.Module,
    tokenizer,
    questions: Sequence[str],
    answers: Sequence[str],
    *,
    batch_size: int = 16,
    max_length: int = 512,
    memorization: bool = False,
    impl: str = "auto",
    prompt_format: PromptFormat | None = None,
) -> SequenceScores:
    """:func:`score_encodings` of (question_i, answer_i) pairs.

    Without ``prompt_format`` they are tokenised as the trainer sees them (``data.tokenize_qa``); with one, the
    evaluation's way, open-unlearning's (``prompts.encode_qa``). No token equal to the pad id is attended to, either
    way (``data.pad_examples``).
    """
    if len(questions) != len(answers):
        raise ValueError(f"questions ({len(questions)}) and answers ({len(answers)}) must have the same length")
    if prompt_format is None:
        encodings = [tokenize_qa(tokenizer, q, a, max_length=max_length) for q, a in zip(questions, answers)]
    else:
        encodings = [
            encode_qa(tokenizer, q, a, prompt_format, max_length=max_length) for q, a in zip(questions, answers)
        ]
    return score_encodings(
        model,
        tokenizer,
        encodings,
        batch_size=batch_size,
        memorization=memorization,
        impl=impl,
    )
