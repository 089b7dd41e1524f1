"""BS-S belief sets: the model's own sampled answers to each forget prompt (docs/math.md, "BS-S").

For every forget prompt x (the tokens before the first counted label) sample N continuations by temperature sampling
(batched, left-padded, under no_grad and eval mode, stopping at the tokenizer's eos / chat end-of-turn token). Each
belief becomes a training example ``input_ids = x + continuation``, ``labels = -100 on x``; a continuation that
stopped is followed by what the forget answers carry after their end-of-turn token (open-unlearning's chat format:
the template's newline and an appended eos), so beliefs end as the answers they stand beside. Off-policy: sampled once
from the initial model; on-policy: ``BeliefRefreshCallback`` resamples the whole forget set every R epochs.

In a distributed run each process samples a strided shard of the prompts and the shards are exchanged, so every
process ends with the same complete belief set.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import TrainerCallback

from bs_kernels import IGNORE_INDEX

from .data import end_of_turn_ids
from .generation import generate_continuations


def prompt_ids_of(example: dict[str, list[int]]) -> list[int]:
    """The prompt of a tokenised example: its tokens before the first label that is not -100."""
    for position, label in enumerate(example["labels"]):
        if label != IGNORE_INDEX:
            return list(example["input_ids"][:position])
    raise ValueError("example has no answer tokens (every label is -100)")


def _as_list(values) -> list[int]:
    return values.tolist() if isinstance(values, torch.Tensor) else list(values)


def prompt_of(input_ids, labels, attention_mask=None) -> tuple[int, ...]:
    """The prompt of one possibly padded row (tensors or lists): its tokens before the first counted label, as a tuple.

    Padding is trimmed only at the padded edge: a left-padded row loses its leading run of masked positions; the
    right padding of a right-padded row lies after the answer and never reaches the prompt. Masked positions inside
    the prompt are kept, so with pad == eos (open-unlearning's default for Llama-3 and SmolLM2, whose collator masks
    every pad-valued token) the end-of-turn tokens of the prompt stay, and every collated row maps to the key of its
    unpadded example whatever the collator and padding side.
    """
    ids, labels = _as_list(input_ids), _as_list(labels)
    start = 0
    if attention_mask is not None:
        mask = _as_list(attention_mask)
        while start < len(mask) and not mask[start]:
            start += 1
    return tuple(prompt_ids_of({"input_ids": ids[start:], "labels": labels[start:]}))


def _unwrap(model):
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model)


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def sample_beliefs(
    model,
    tokenizer,
    prompts: list[list[int]],
    *,
    num_samples: int = 3,
    temperature: float = 1.0,
    max_new_tokens: int = 200,
    batch_size: int = 8,
    stop_ids: list[int] | None = None,
    answer_labels=None,
) -> list[list[dict[str, list[int]]]]:
    """Sample ``num_samples`` continuations per prompt; returns, per prompt, that many belief examples.

    Args:
        model: a causal LM, possibly wrapped (DDP/accelerate); it is unwrapped, put in eval mode for the sampling and
            restored to its previous mode afterwards.
        prompts: token ids per prompt (no padding).
        stop_ids: ids that end a continuation (default: ``end_of_turn_ids(tokenizer)``); the stop token is kept as
            a label, as the forget answers keep theirs.
        answer_labels: the labels of one forget example (list or tensor); the counted labels after its first stop
            id (:func:`answer_tail`) follow every continuation that stopped. None: nothing follows.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not prompts:
        raise ValueError("no prompts to sample beliefs for")
    stop_ids = list(stop_ids) if stop_ids is not None else end_of_turn_ids(tokenizer)
    if not stop_ids:
        raise ValueError("the tokenizer has no eos / end-of-turn token to stop generation at; pass stop_ids")
    tail = answer_tail(answer_labels, stop_ids) if answer_labels is not None else []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    rank, world = _distributed()
    my_indices = list(range(rank, len(prompts), world))
    continuations = generate_continuations(
        _unwrap(model),
        [prompts[i] for i in my_indices],
        pad_id=pad_id,
        stop_ids=stop_ids,
        batch_size=batch_size,
        num_return_sequences=num_samples,
        max_new_tokens=max_new_tokens,
        do_sample=True,
        temperature=temperature,
        top_k=0,  # pure temperature sampling over the whole vocabulary (generate's default is top-50)
        top_p=1.0,
    )
    stops = set(stop_ids)
    mine = {
        index: [
            _belief(prompts[index], tokens + tail if tokens and tokens[-1] in stops else tokens) for tokens in samples
        ]
        for index, samples in zip(my_indices, continuations)
    }
    if world > 1:
        shards: list[dict | None] = [None] * world
        torch.distributed.all_gather_object(shards, mine)
        for shard in shards:
            mine.update(shard)
    return [mine[i] for i in range(len(prompts))]


def _belief(prompt: list[int], answer: list[int]) -> dict[str, list[int]]:
    return {"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer}


def answer_tail(labels, stop_ids) -> list[int]:
    """The counted labels (not -100) after the first stop id among them: what a forget answer carries after its
    end-of-turn token ([] when nothing follows it or no stop id is counted)."""
    counted = [int(token) for token in _as_list(labels) if token != IGNORE_INDEX]
    stops = set(int(token) for token in stop_ids)
    for position, token in enumerate(counted):
        if token in stops:
            return counted[position + 1 :]
    return []


class BeliefRefreshCallback(TrainerCallback):
    """Calls ``refresh(model)`` at the start of the epochs where a belief set is due.

    Due: epoch 0 when ``at_start`` (the drop-in samples its set when training starts; the driver samples before it),
    and every epoch e > 0 with ``every > 0`` and e % every == 0 (on-policy resampling from the current model). Each
    epoch is refreshed at most once; ``refreshed_at`` lists them. ``refresh`` returns False when it had nothing to
    sample (the epoch then stays due).
    """

    def __init__(self, refresh: Callable[[object], None], *, every: int, at_start: bool = False) -> None:
        if not isinstance(every, int) or every < 0:
            raise ValueError(f"every (the on-policy resampling period in epochs) must be an int >= 0, got {every!r}")
        self.refresh = refresh
        self.every = every
        self.at_start = at_start
        self.refreshed_at: list[int] = []

    def is_due(self, epoch: int) -> bool:
        if epoch in self.refreshed_at:
            return False
        if epoch == 0:
            return self.at_start
        return self.every > 0 and epoch % self.every == 0

    def on_epoch_begin(self, args, state, control, model=None, **kwargs):
        epoch = round(state.epoch or 0)
        self.refresh_if_due(epoch, model)
        return control

    def refresh_if_due(self, epoch: int, model) -> None:
        if self.is_due(epoch) and self.refresh(model) is not False:
            self.refreshed_at.append(epoch)


class EpochCallback(TrainerCallback):
    """Tells a ForgetRetainDataset the epoch, so each epoch draws fresh retain partners."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(round(state.epoch or 0))
        return control
