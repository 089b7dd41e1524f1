"""BS-S belief sets: the model's own sampled answers to each forget prompt (SPEC.md, "BS-S").

For every forget prompt x (the tokens before the first counted label) sample N continuations by temperature sampling
(batched, left-padded, under no_grad and eval mode, stopping at the tokenizer's eos / chat end-of-turn token). Each
belief becomes a training example ``input_ids = x + continuation``, ``labels = -100 on x``. Off-policy: sampled once
from the initial model; on-policy: ``BeliefRefreshCallback`` resamples the whole forget set every R epochs.

In a distributed run each process samples a strided shard of the prompts and the shards are exchanged, so every
process ends with the same complete belief set.
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from .data import IGNORE_INDEX, end_of_turn_ids, pad_examples


def prompt_ids_of(example: dict[str, list[int]]) -> list[int]:
    """The prompt of a tokenised example: its tokens before the first label that is not -100."""
    for position, label in enumerate(example["labels"]):
        if label != IGNORE_INDEX:
            return list(example["input_ids"][:position])
    raise ValueError("example has no answer tokens (every label is -100)")


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
) -> list[list[dict[str, list[int]]]]:
    """Sample ``num_samples`` continuations per prompt; returns, per prompt, that many belief examples.

    Args:
        model: a causal LM, possibly wrapped (DDP/accelerate); it is unwrapped, put in eval mode for the sampling and
            restored to its previous mode afterwards.
        prompts: token ids per prompt (no padding).
        stop_ids: ids that end a continuation (default: ``end_of_turn_ids(tokenizer)``); the stop token is kept as
            the belief's last label, as the forget answers keep theirs.
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
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    stop_set = set(stop_ids)

    generator_model = _unwrap(model)
    was_training = generator_model.training
    device = next(generator_model.parameters()).device
    rank, world = _distributed()
    my_indices = list(range(rank, len(prompts), world))
    mine: dict[int, list[dict[str, list[int]]]] = {}
    generator_model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(my_indices), batch_size):
                chunk = my_indices[start : start + batch_size]
                batch = pad_examples([{"input_ids": prompts[i]} for i in chunk], pad_id, side="left")
                prompt_length = batch["input_ids"].shape[1]
                generated = generator_model.generate(
                    input_ids=batch["input_ids"].to(device),
                    attention_mask=batch["attention_mask"].to(device),
                    do_sample=True,
                    temperature=temperature,
                    top_k=0,  # pure temperature sampling over the whole vocabulary (generate's default is top-50)
                    top_p=1.0,
                    num_return_sequences=num_samples,
                    max_new_tokens=max_new_tokens,
                    eos_token_id=stop_ids,
                    pad_token_id=pad_id,
                )
                # generated: [len(chunk) * num_samples, prompt_length + new], samples of one prompt are adjacent.
                continuations = generated[:, prompt_length:].tolist()
                for row, tokens in enumerate(continuations):
                    cut = next((j + 1 for j, t in enumerate(tokens) if t in stop_set), len(tokens))
                    prompt = prompts[chunk[row // num_samples]]
                    belief = {"input_ids": prompt + tokens[:cut], "labels": [IGNORE_INDEX] * len(prompt) + tokens[:cut]}
                    mine.setdefault(chunk[row // num_samples], []).append(belief)
    finally:
        generator_model.train(was_training)
    if world > 1:
        shards: list[dict | None] = [None] * world
        torch.distributed.all_gather_object(shards, mine)
        for shard in shards:
            mine.update(shard)
    return [mine[i] for i in range(len(prompts))]


class BeliefRefreshCallback(TrainerCallback):
    """On-policy BS-S: resample the whole forget set's beliefs from the current model every ``every`` epochs.

    The beliefs for epoch 0 are sampled before training (from the initial model); at the start of epoch e > 0 with
    e % every == 0 they are resampled and handed to ``dataset.set_beliefs``.
    """

    def __init__(self, dataset, tokenizer, prompts: list[list[int]], *, every: int = 2, **sample_kwargs) -> None:
        if every < 1:
            raise ValueError(f"every (the on-policy resampling period in epochs) must be >= 1, got {every}")
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.prompts = prompts
        self.every = every
        self.sample_kwargs = sample_kwargs
        self.refreshed_at: list[int] = []

    def on_epoch_begin(self, args, state, control, model=None, **kwargs):
        epoch = round(state.epoch or 0)
        if epoch > 0 and epoch % self.every == 0 and epoch not in self.refreshed_at:
            self.dataset.set_beliefs(sample_beliefs(model, self.tokenizer, self.prompts, **self.sample_kwargs))
            self.refreshed_at.append(epoch)
        return control


class EpochCallback(TrainerCallback):
    """Tells a ForgetRetainDataset the epoch, so each epoch draws fresh retain partners."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(round(state.epoch or 0))
        return control
