"""Model-facing scorers: (question, answer) pairs -> per-sequence numbers, and batched generation.

The layer between the data (``data``: prompts, tokenisation, padding) and the metrics (``metrics``: pure functions
and whole evaluations). Everything here runs the model under ``no_grad`` in eval mode and restores the mode after.

- :func:`score_encodings` / :func:`score_answers`: mean per-token log p(answer | prompt) with the package's fused
  ``forget_logprobs`` (one batch's logits alive at a time, never a [N, T, V] stack); optionally the token-level
  squeezing view (p(label) and the mass on the top-k other tokens) and, for Exact Memorization / Extraction
  Strength, whether each answer position's teacher-forced argmax is its label (from the fused BS-T pass's top-k).
- :func:`generate_continuations`: the one left-padded batched ``generate`` loop (greedy answers, beam search, the
  leak-rate samples and BS-S belief sampling all go through it); :func:`generate_answers` decodes its output.
- :func:`sample_answers`: greedy plus seeded temperature samples per question (the leak rate's answers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from bs_kernels import IGNORE_INDEX, bs_token_loss, forget_logprobs

from .data import end_of_turn_ids, pad_examples, tokenize_prompt, tokenize_qa
from .fused import fused_supported
from .prompts import PromptFormat, encode_prompt, encode_qa

__all__ = [
    "SequenceScores",
    "alt_mass_view",
    "argmax_matches",
    "attention_mask_of",
    "clean_up_tokenization",
    "generate_answers",
    "generate_continuations",
    "mean_token_logprobs",
    "model_device",
    "pad_token_id",
    "sample_answers",
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


def attention_mask_of(batch: dict, pad_id: int, mask_pad_tokens: bool) -> torch.Tensor:
    """The attention mask of a padded batch (``data.pad_examples``); with ``mask_pad_tokens`` also 0 on every token
    equal to ``pad_id``, as open-unlearning's collator builds it (``input_ids != pad_token_id``): with pad = eos, as it
    sets for a tokenizer without a pad token (Llama-3), the end-of-turn tokens inside every prompt are masked too, and
    its numbers depend on it (docs/math.md, "Evaluation protocol")."""
    mask = batch["attention_mask"]
    return mask * (batch["input_ids"] != pad_id).to(mask.dtype) if mask_pad_tokens else mask


# transformers 4.x's clean_up_tokenization, which open-unlearning's decoding applies to every tokenizer (5.x skips it
# for BPE tokenizers), in its order.
_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"))
_CLEAN_UP += ((" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def clean_up_tokenization(text: str) -> str:
    """Spaces before punctuation and English contractions removed, as open-unlearning's decoding does
    (``clean_up_tokenization_spaces=True`` under transformers 4.x): "Kuwaiti 's father ." -> "Kuwaiti's father."."""
    for before, after in _CLEAN_UP:
        text = text.replace(before, after)
    return text


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
    mask_pad_tokens: bool = False,
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
        mask_pad_tokens: attend to no token equal to the pad id (:func:`attention_mask_of`), as open-unlearning does.
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
            batch["attention_mask"] = attention_mask_of(batch, pad_token_id(tokenizer), mask_pad_tokens)
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
    evaluation's way, open-unlearning's (``prompts.encode_qa``, and no token equal to the pad id is attended to).
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
        mask_pad_tokens=prompt_format is not None,
    )


# --------------------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_continuations(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    pad_id: int,
    stop_ids: Sequence[int],
    batch_size: int,
    num_return_sequences: int = 1,
    max_new_tokens: int,
    mask_pad_tokens: bool = False,
    **generate_kwargs,
) -> list[list[list[int]]]:
    """Per prompt, its ``num_return_sequences`` continuations (token ids after the prompt), batched, left-padded.

    Prompts are taken in order, ``batch_size`` at a time, left-padded with ``data.pad_examples(..., side="left")``;
    each batch is one ``model.generate(input_ids, attention_mask, num_return_sequences=..., max_new_tokens=...,
    eos_token_id=stop_ids, pad_token_id=pad_id, **generate_kwargs)`` call under no_grad with the model in eval mode
    (its mode is restored afterwards), on the device of its parameters. ``do_sample`` defaults to False (greedy, or
    beam search with ``num_beams``) whatever the model's generation config says; sampling callers pass
    ``do_sample=True`` (and ``top_k=0`` for pure temperature sampling: generate's default is top-50).

    ``mask_pad_tokens``: the prompts attend to no token equal to ``pad_id`` (:func:`attention_mask_of`), as in
    open-unlearning's generation (``generate`` then counts positions over the attended tokens only).

    Each continuation is cut after its first stop id (the stop id is kept), so no padding is returned.
    The model is used as given (unwrap DDP / accelerate wrappers before calling).
    """
    if batch_size < 1 or max_new_tokens < 1 or num_return_sequences < 1:
        raise ValueError(
            f"batch_size, max_new_tokens and num_return_sequences must be >= 1, got {batch_size}, {max_new_tokens}, "
            f"{num_return_sequences}"
        )
    if any(len(prompt) == 0 for prompt in prompts):
        raise ValueError("every prompt needs at least one token")
    stop_ids = [int(i) for i in stop_ids]
    stop_set = set(stop_ids)
    generate_kwargs.setdefault("do_sample", False)
    was_training = model.training
    model.eval()
    device = model_device(model)
    results: list[list[list[int]]] = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = pad_examples(
                [{"input_ids": list(prompt)} for prompt in prompts[start : start + batch_size]], pad_id, side="left"
            )
            input_ids = batch["input_ids"].to(device)
            output = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask_of(batch, pad_id, mask_pad_tokens).to(device),
                max_new_tokens=max_new_tokens,
                num_return_sequences=num_return_sequences,
                pad_token_id=pad_id,
                eos_token_id=stop_ids,
                **generate_kwargs,
            )
            # output: [len(batch) * num_return_sequences, prompt_length + new]; one prompt's rows are adjacent.
            rows = output[:, input_ids.shape[1] :].tolist()
            for first in range(0, len(rows), num_return_sequences):
                continuations = []
                for tokens in rows[first : first + num_return_sequences]:
                    cut = next((j + 1 for j, t in enumerate(tokens) if t in stop_set), len(tokens))
                    continuations.append(tokens[:cut])
                results.append(continuations)
    finally:
        model.train(was_training)
    return results


def generate_answers(
    model: torch.nn.Module,
    tokenizer,
    questions: Sequence[str],
    *,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    num_return_sequences: int = 1,
    prompt_format: PromptFormat | None = None,
    **generate_kwargs,
) -> list[list[str]]:
    """Decoded continuations per question (greedy unless generate_kwargs say otherwise), batched with left padding.

    Returns a list (one per question) of ``num_return_sequences`` strings, decoded as open-unlearning decodes them:
    special tokens removed, :func:`clean_up_tokenization`, stripped.
    Prompts are ``data.tokenize_prompt`` (the trainer's) or, with ``prompt_format``, the evaluation's,
    open-unlearning's (``prompts.encode_prompt``, attending to no token equal to the pad id); generation is
    :func:`generate_continuations` with the tokenizer's pad id and :func:`stop_token_ids`.
    """
    if prompt_format is None:
        prompts = [tokenize_prompt(tokenizer, q) for q in questions]
    else:
        prompts = [encode_prompt(tokenizer, q, prompt_format) for q in questions]
    continuations = generate_continuations(
        model,
        prompts,
        pad_id=pad_token_id(tokenizer),
        stop_ids=stop_token_ids(tokenizer, model),
        batch_size=batch_size,
        num_return_sequences=num_return_sequences,
        max_new_tokens=max_new_tokens,
        mask_pad_tokens=prompt_format is not None,
        **generate_kwargs,
    )
    return [
        [
            clean_up_tokenization(
                tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            ).strip()
            for tokens in per_prompt
        ]
        for per_prompt in continuations
    ]


def temperature_samples(
    model: torch.nn.Module,
    tokenizer,
    questions: Sequence[str],
    *,
    num_samples: int,
    temperature: float = 1.0,
    max_new_tokens: int = 48,
    seed: int = 0,
    batch_size: int = 16,
    prompt_format: PromptFormat | None = None,
) -> list[list[str]]:
    """Per question, ``num_samples`` seeded temperature samples (pure: top_k=0, top_p=1, the whole vocabulary), with
    the prompts of :func:`generate_answers` (``prompt_format``).

    The CPU generator and the model device's generator are seeded with ``seed`` for the call and the global RNG
    state is restored afterwards, so calling this changes no other random stream.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    device = model_device(model)
    cuda_devices = (
        [device.index if device.index is not None else torch.cuda.current_device()] if (device.type == "cuda") else []
    )
    with torch.random.fork_rng(devices=cuda_devices):
        torch.default_generator.manual_seed(seed)
        for index in cuda_devices:
            torch.cuda.default_generators[index].manual_seed(seed)
        return generate_answers(
            model,
            tokenizer,
            questions,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            num_return_sequences=num_samples,
            prompt_format=prompt_format,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
        )


def sample_answers(
    model: torch.nn.Module,
    tokenizer,
    questions: Sequence[str],
    *,
    num_samples: int,
    temperature: float = 1.0,
    max_new_tokens: int = 48,
    seed: int = 0,
    batch_size: int = 16,
    prompt_format: PromptFormat | None = None,
) -> list[list[str]]:
    """Per question, the greedy answer followed by ``num_samples`` :func:`temperature_samples` (the leak rate's
    answers), both with the prompts of ``prompt_format`` (:func:`generate_answers`). ``num_samples=0`` gives the
    greedy answers only."""
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    greedy = generate_answers(
        model, tokenizer, questions, max_new_tokens=max_new_tokens, batch_size=batch_size, prompt_format=prompt_format
    )
    if num_samples == 0:
        return greedy
    samples = temperature_samples(
        model,
        tokenizer,
        questions,
        num_samples=num_samples,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        seed=seed,
        batch_size=batch_size,
        prompt_format=prompt_format,
    )
    return [first + rest for first, rest in zip(greedy, samples)]
