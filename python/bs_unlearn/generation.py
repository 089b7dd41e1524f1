"""Batched generation: left-padded ``generate`` over token prompts, and the decoded answers built on it.

Beside ``scoring`` (whose helpers it shares: the device, the pad and stop ids, the attention mask), below the metrics.

- :func:`generate_continuations`: the one left-padded batched ``generate`` loop (greedy answers, beam search, the
  leak-rate samples and BS-S belief sampling all go through it); :func:`generate_answers` decodes its output.
  Plain greedy decoding takes :func:`greedy_continuations` instead: the same tokens, with each row leaving the batch
  when it stops (an evaluation's answers mostly stop long before the 200-token cap; ``generate`` computes the
  finished rows until the batch's longest answer ends).
- :func:`temperature_samples`: seeded pure temperature samples per question, leaving every other random stream alone.
- :func:`sample_answers`: greedy plus seeded temperature samples per question (the leak rate's answers).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

from .data import pad_examples, tokenize_prompt
from .prompts import PromptFormat, encode_prompt
from .scoring import model_device, pad_token_id, stop_token_ids

__all__ = [
    "clean_up_tokenization",
    "generate_answers",
    "generate_continuations",
    "greedy_continuations",
    "sample_answers",
    "temperature_samples",
]


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
    **generate_kwargs,
) -> list[list[list[int]]]:
    """Per prompt, its ``num_return_sequences`` continuations (token ids after the prompt), batched, left-padded.

    Prompts are taken in order, ``batch_size`` at a time, left-padded with ``data.pad_examples(..., side="left")``;
    each batch is one ``model.generate(input_ids, attention_mask, num_return_sequences=..., max_new_tokens=...,
    eos_token_id=stop_ids, pad_token_id=pad_id, **generate_kwargs)`` call under no_grad with the model in eval mode
    (its mode is restored afterwards), on the device of its parameters. ``do_sample`` defaults to False (greedy, or
    beam search with ``num_beams``) whatever the model's generation config says; sampling callers pass
    ``do_sample=True`` (and ``top_k=0`` for pure temperature sampling: generate's default is top-50).

    The prompts attend to no token equal to ``pad_id`` (``data.pad_examples``), as in open-unlearning's generation
    (``generate`` then counts positions over the attended tokens only).

    Each continuation is cut after its first stop id (the stop id is kept), so no padding is returned.
    The model is used as given (unwrap DDP / accelerate wrappers before calling). Plain greedy decoding (no sampling,
    one beam, one sequence, no logits processor in the model's generation config, a model whose forward takes a
    cache and ``logits_to_keep``) runs :func:`greedy_continuations` in place of ``generate``: the same tokens.
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
    plain = num_return_sequences == 1 and _plain_greedy(model, generate_kwargs)
    cache_key = _greedy_cache_key(model) if plain else None
    results: list[list[list[int]]] = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = pad_examples(
                [{"input_ids": list(prompt)} for prompt in prompts[start : start + batch_size]], pad_id, side="left"
            )
            input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            if cache_key is not None:
                rows = greedy_continuations(
                    model,
                    input_ids,
                    attention_mask,
                    max_new_tokens=max_new_tokens,
                    stop_ids=stop_ids,
                    cache_key=cache_key,
                )
                results += [[tokens] for tokens in rows]
                continue
            output = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
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


# Generation-config fields with which greedy decoding is more than the argmax of the logits (transformers' logits
# processors that act without sampling, and num_beams). Away from their defaults, generation goes through ``generate``.
_GREEDY_PROCESSORS = (
    "bad_words_ids",
    "begin_suppress_tokens",
    "encoder_no_repeat_ngram_size",
    "encoder_repetition_penalty",
    "exponential_decay_length_penalty",
    "forced_bos_token_id",
    "forced_decoder_ids",
    "forced_eos_token_id",
    "guidance_scale",
    "min_length",
    "min_new_tokens",
    "no_repeat_ngram_size",
    "num_beams",
    "repetition_penalty",
    "sequence_bias",
    "suppress_tokens",
    "watermarking_config",
)


def _plain_greedy(model: torch.nn.Module, generate_kwargs: dict) -> bool:
    """Whether ``generate`` with these kwargs would pick each token as the argmax of the last logits and nothing
    else."""
    if generate_kwargs != {"do_sample": False}:
        return False
    config = getattr(model, "generation_config", None)
    if config is None or getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return False
    from transformers import GenerationConfig

    defaults = GenerationConfig()
    return all(getattr(config, name, None) == getattr(defaults, name, None) for name in _GREEDY_PROCESSORS)


def _greedy_cache_key(model: torch.nn.Module) -> str | None:
    """The name under which the model's forward takes its key/value cache (``cache`` from transformers 5,
    ``past_key_values`` before), or None when it does not take one with ``logits_to_keep``."""
    parameters = inspect.signature(model.forward).parameters
    if "logits_to_keep" not in parameters or "position_ids" not in parameters:
        return None
    return next((key for key in ("cache", "past_key_values") if key in parameters), None)


@torch.no_grad()
def greedy_continuations(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    cache_key: str = "cache",
) -> list[list[int]]:
    """Greedy continuations of a left-padded batch, each cut after its first stop id: the tokens ``generate``
    returns for plain greedy decoding, computed as ``generate`` computes them (position ids from the attention mask,
    logits of the last position only, argmax of them in float32) except that a row leaves the batch, its cache rows
    dropped, once it emits a stop id.

    ``cache_key``: the forward's keyword for the key/value cache (``cache``; ``past_key_values`` before
    transformers 5). The model must be in eval mode; no gradients are kept.
    """
    stops = torch.tensor(sorted({int(i) for i in stop_ids}), device=input_ids.device)
    results: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    rows = list(range(input_ids.shape[0]))  # the batch's rows still generating, in results' order
    mask = attention_mask.long()
    positions = (mask.cumsum(-1) - 1).masked_fill_(mask == 0, 1)
    step_ids, cache = input_ids, None
    for step in range(max_new_tokens):
        output = model(
            input_ids=step_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{cache_key: cache},
        )
        cache = getattr(output, cache_key)
        tokens = output.logits[:, -1].float().argmax(-1)
        for row, token in zip(rows, tokens.tolist()):
            results[row].append(token)
        going = ~torch.isin(tokens, stops)
        if step == max_new_tokens - 1 or not going.any():
            break
        if not going.all():
            keep = going.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            tokens, mask = tokens[keep], mask[keep]
            rows = [rows[i] for i in keep.tolist()]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        positions = mask.cumsum(-1)[:, -1:] - 1
        step_ids = tokens[:, None]
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
    open-unlearning's (``prompts.encode_prompt``); generation is
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
