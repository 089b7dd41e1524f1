"""BS-S belief sampling: N samples per prompt, prompt labelled -100, stop tokens, eval mode, wrapped models."""

from __future__ import annotations

import pytest
import torch
from bs_unlearn import beliefs, data
from driver_fixtures import build_model, build_tokenizer

QUESTIONS = ["what is the look of item1 ?", "what is the look of item2 ?", "what is the look of item13 ?"]


def _prompts(tokenizer):
    return [data.tokenize_prompt(tokenizer, q) for q in QUESTIONS]


def _check_beliefs(result, prompts, num_samples, max_new_tokens, stop_ids):
    assert len(result) == len(prompts)
    for prompt, samples in zip(prompts, result):
        assert len(samples) == num_samples
        for belief in samples:
            n = len(prompt)
            assert belief["input_ids"][:n] == prompt
            assert belief["labels"][:n] == [data.IGNORE_INDEX] * n
            continuation = belief["labels"][n:]
            assert continuation == belief["input_ids"][n:]
            assert 1 <= len(continuation) <= max_new_tokens
            assert all(t != data.IGNORE_INDEX for t in continuation)
            # Stops at the first stop token (kept as the last label), or runs to the length limit.
            stops = [j for j, t in enumerate(continuation) if t in stop_ids]
            assert stops in ([], [len(continuation) - 1])
            if not stops:
                assert len(continuation) == max_new_tokens


def test_samples_n_beliefs_per_prompt_with_prompt_masked():
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    model.train()
    prompts = _prompts(tokenizer)
    result = beliefs.sample_beliefs(model, tokenizer, prompts, num_samples=4, max_new_tokens=6, batch_size=2)
    _check_beliefs(result, prompts, 4, 6, {tokenizer.eos_token_id})
    assert model.training  # mode restored


def test_stops_at_end_of_turn_token():
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    # A zero final-norm weight makes every logit 0: uniform sampling over 56 ids, so with two stop ids most beliefs
    # stop well before the 30-token limit (P(no stop in 30) = (50/52)^30, about 0.3).
    stop_id = tokenizer.convert_tokens_to_ids("and")
    with torch.no_grad():
        model.model.norm.weight.zero_()
    prompts = _prompts(tokenizer)
    result = beliefs.sample_beliefs(
        model, tokenizer, prompts, num_samples=3, max_new_tokens=30, stop_ids=[stop_id, tokenizer.eos_token_id]
    )
    _check_beliefs(result, prompts, 3, 30, {stop_id, tokenizer.eos_token_id})
    assert any(len(b["input_ids"]) < len(p) + 30 for p, s in zip(prompts, result) for b in s)


def test_beliefs_that_stop_end_as_the_forget_answers_do():
    """answer_labels: what a forget answer carries after its end-of-turn token (open-unlearning's chat format: the
    template's newline and an eos) follows every continuation that stopped, and none that ran to the limit."""
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    stop_id, newline_id, eos_id = tokenizer.convert_tokens_to_ids("and"), 7, tokenizer.eos_token_id
    with torch.no_grad():
        model.model.norm.weight.zero_()  # uniform sampling: some beliefs stop, some run to the limit
    prompts = _prompts(tokenizer)
    answer = [-100, -100, 11, 12, stop_id, newline_id, eos_id, -100]  # right padding after the answer
    assert beliefs.answer_tail(answer, [stop_id, eos_id]) == [newline_id, eos_id]
    assert beliefs.answer_tail(torch.tensor(answer), [eos_id]) == []  # the eos is the last counted label
    assert beliefs.answer_tail([-100, 11, 12], [stop_id]) == []
    torch.manual_seed(0)
    result = beliefs.sample_beliefs(
        model, tokenizer, prompts, num_samples=8, max_new_tokens=30, stop_ids=[stop_id, eos_id], answer_labels=answer
    )
    ended, cut = 0, 0
    for prompt, samples in zip(prompts, result):
        for belief in samples:
            continuation = belief["labels"][len(prompt) :]
            assert continuation == belief["input_ids"][len(prompt) :]
            stops = [j for j, t in enumerate(continuation) if t in (stop_id, eos_id)]
            if stops and stops[0] < 30:
                assert continuation[stops[0] :] == [continuation[stops[0]], newline_id, eos_id]
                ended += 1
            else:
                assert len(continuation) == 30 and not stops
                cut += 1
    assert ended and cut


def test_temperature_controls_spread():
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    prompts = _prompts(tokenizer)[:1]
    torch.manual_seed(0)
    cold = beliefs.sample_beliefs(model, tokenizer, prompts, num_samples=6, temperature=1e-4, max_new_tokens=5)
    continuations = {tuple(b["input_ids"]) for b in cold[0]}
    assert len(continuations) == 1  # near-greedy: all samples agree
    warm = beliefs.sample_beliefs(model, tokenizer, prompts, num_samples=6, temperature=5.0, max_new_tokens=5)
    assert len({tuple(b["input_ids"]) for b in warm[0]}) > 1


def test_unwraps_ddp_model(tmp_path):
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        prompts = _prompts(tokenizer)
        result = beliefs.sample_beliefs(wrapped, tokenizer, prompts, num_samples=2, max_new_tokens=4)
        _check_beliefs(result, prompts, 2, 4, {tokenizer.eos_token_id})
    finally:
        torch.distributed.destroy_process_group()


def test_prompt_of_example_and_bad_arguments():
    example = {"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4]}
    assert beliefs.prompt_ids_of(example) == [1, 2]
    with pytest.raises(ValueError, match="no answer tokens"):
        beliefs.prompt_ids_of({"input_ids": [1], "labels": [-100]})
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    for kwargs, name in [({"num_samples": 0}, "num_samples"), ({"temperature": 0.0}, "temperature")]:
        with pytest.raises(ValueError, match=name):
            beliefs.sample_beliefs(model, tokenizer, [[1, 2]], **kwargs)


def test_on_policy_callback_resamples_every_r_epochs():
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    prompts = _prompts(tokenizer)
    forget = [{"input_ids": p + [3], "labels": [-100] * len(p) + [3]} for p in prompts]
    dataset = data.ForgetRetainDataset(forget, None)

    def resample(current_model) -> None:
        dataset.set_beliefs(beliefs.sample_beliefs(current_model, tokenizer, prompts, num_samples=2, max_new_tokens=3))

    callback = beliefs.BeliefRefreshCallback(resample, every=2)

    class State:
        epoch = 0.0

    for epoch in range(5):
        State.epoch = float(epoch)
        callback.on_epoch_begin(None, State, None, model=model)
    assert callback.refreshed_at == [2, 4]
    assert dataset.beliefs is not None and all(len(s) == 2 for s in dataset.beliefs)
    at_start = beliefs.BeliefRefreshCallback(resample, every=0, at_start=True)
    for epoch in range(3):
        State.epoch = float(epoch)
        at_start.on_epoch_begin(None, State, None, model=model)
    assert at_start.refreshed_at == [0]  # off-policy: sampled once, when training starts


def _collate_like_open_unlearning(examples: list[dict], pad_id: int, side: str) -> dict:
    """open-unlearning's DataCollatorForSupervisedDataset: pad to the longest, attention_mask = input_ids != pad."""
    width = max(len(example["input_ids"]) for example in examples)
    rows, labels = [], []
    for example in examples:
        padding = width - len(example["input_ids"])
        if side == "right":
            rows.append(example["input_ids"] + [pad_id] * padding)
            labels.append(example["labels"] + [data.IGNORE_INDEX] * padding)
        else:
            rows.append([pad_id] * padding + example["input_ids"])
            labels.append([data.IGNORE_INDEX] * padding + example["labels"])
    input_ids = torch.tensor(rows)
    return {"input_ids": input_ids, "labels": torch.tensor(labels), "attention_mask": input_ids.ne(pad_id)}


@pytest.mark.parametrize("side", ["right", "left"])
def test_prompt_of_keeps_end_of_turn_tokens_when_pad_is_eos(side):
    """pad == eos (open-unlearning's Llama-3 default): the masked eos inside a prompt stays part of its key."""
    eos = 3
    # system turn <eos> user turn <eos> assistant header | answer <eos>, of different lengths
    examples = [
        {"input_ids": [2, 10, 11, eos, 12, 13, eos, 14, 20, 21, eos], "labels": [-100] * 8 + [20, 21, eos]},
        {"input_ids": [2, 10, eos, 15, eos, 14, 22, eos], "labels": [-100] * 6 + [22, eos]},
    ]
    batch = _collate_like_open_unlearning(examples, pad_id=eos, side=side)
    assert not batch["attention_mask"].all()  # the end-of-turn tokens are masked as padding
    for row, example in enumerate(examples):
        key = beliefs.prompt_of(batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row])
        assert key == beliefs.prompt_of(example["input_ids"], example["labels"], [1] * len(example["input_ids"]))
        assert list(key) == beliefs.prompt_ids_of(example)
        assert key.count(eos) == example["input_ids"][: len(key)].count(eos) == 2
