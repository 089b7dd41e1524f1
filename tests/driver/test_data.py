"""bs_unlearn.data: loading TOFU-format JSON Lines, prompt formatting, label masking, pairing and padding."""

from __future__ import annotations

import json

import pytest
import torch
from bs_unlearn import data
from bs_unlearn.prompts import encode_qa
from driver_fixtures import build_tokenizer, qa_rows, write_jsonl


def test_load_keeps_rows_and_optional_columns(tmp_path):
    dataset = data.load_qa_jsonl(write_jsonl(tmp_path / "qa.jsonl", qa_rows(range(5))))
    assert len(dataset) == 5
    assert {"question", "answer", "paraphrased_answer", "perturbed_answer"} <= set(dataset.column_names)
    assert dataset[2]["answer"] == qa_rows([2])[0]["answer"]


def test_load_subset_is_seeded(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", qa_rows(range(20)))
    first = data.load_qa_jsonl(path, max_examples=5, seed=3)["question"]
    assert first == data.load_qa_jsonl(path, max_examples=5, seed=3)["question"]
    assert first != data.load_qa_jsonl(path, max_examples=5, seed=4)["question"]
    assert len(first) == 5


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "no examples"),
        ('{"question": "q"}\n', "line 1: missing string field 'answer'"),
        ('{"question": "q", "answer": "a"}\n{"answer": "a"}\n', "line 2: missing string field 'question'"),
        ('{"question": "q", "answer": "a"}\nnot json\n', "line 2: not valid JSON"),
        ("[1, 2]\n", "expected a JSON object"),
    ],
)
def test_load_rejects_bad_files(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        data.load_qa_jsonl(path)


def test_load_rejects_missing_and_undecodable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        data.load_qa_jsonl(tmp_path / "absent.jsonl")
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="cannot read"):
        data.load_qa_jsonl(binary)
    with pytest.raises(ValueError, match="not a file"):
        data.load_qa_jsonl(tmp_path)


def test_plain_format_masks_prompt_and_ends_with_eos():
    tokenizer = build_tokenizer()
    example = data.tokenize_qa(tokenizer, "what is the look of item3 ?", "item3 is black and round .")
    text = tokenizer.decode(example["input_ids"])
    assert text.startswith("[BOS] Question : what is the look of item3 ? Answer :")
    answer_ids = [t for t in example["labels"] if t != data.IGNORE_INDEX]
    assert tokenizer.decode(answer_ids) == "item3 is black and round . [EOS]"
    n_prompt = len(data.tokenize_prompt(tokenizer, "what is the look of item3 ?"))
    assert example["labels"][:n_prompt] == [data.IGNORE_INDEX] * n_prompt
    assert example["labels"][n_prompt:] == example["input_ids"][n_prompt:]


def _chat_tokenizer():
    """The tiny tokenizer plus a chat template whose assistant turn ends with an extra special token [END]."""
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["[END]", "[USER]", "[BOT]"]})
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}[USER] {{ m['content'] }} [END] "
        "{% else %}[BOT] {{ m['content'] }} [END] item0 {% endif %}{% endfor %}"
        "{% if add_generation_prompt %}[BOT] {% endif %}"
    )
    return tokenizer


def test_chat_template_format_reads_end_of_turn_from_template():
    tokenizer = _chat_tokenizer()
    end = tokenizer.convert_tokens_to_ids("[END]")
    assert data.end_of_turn_ids(tokenizer) == sorted({tokenizer.eos_token_id, end})
    example = data.tokenize_qa(tokenizer, "what is it ?", "it is red .")
    answer_ids = [t for t in example["labels"] if t != data.IGNORE_INDEX]
    # Trained on to its end as open-unlearning trains and scores it: the turn's end, what the template writes after
    # it ("item0") and eos.
    assert tokenizer.decode(answer_ids) == "it is red . [END] item0 [EOS]"
    assert example == encode_qa(tokenizer, "what is it ?", "it is red .", data.TRAINING_PROMPT_FORMAT)
    # After the system turn of the evaluation's prompt format (this template writes it as an assistant turn).
    assert tokenizer.decode(example["input_ids"]).endswith(
        "item0 [USER] what is it ? [END] [BOT] it is red . [END] item0 [EOS]"
    )


def test_chat_truncation_keeps_prompt_and_refuses_no_room():
    tokenizer = _chat_tokenizer()
    full = data.tokenize_qa(tokenizer, "what is it ?", "it is red .")
    n_prompt = full["labels"].count(data.IGNORE_INDEX)
    cut = data.tokenize_qa(tokenizer, "what is it ?", "it is red .", max_length=n_prompt + 2)
    assert cut == {key: value[: n_prompt + 2] for key, value in full.items()}
    with pytest.raises(ValueError, match="max_length"):
        data.tokenize_qa(tokenizer, "what is it ?", "it is red .", max_length=n_prompt)


def test_truncation_keeps_prompt_and_refuses_no_room():
    tokenizer = build_tokenizer()
    n_prompt = len(data.tokenize_prompt(tokenizer, "what is the look of item3 ?"))
    example = data.tokenize_qa(tokenizer, "what is the look of item3 ?", "item3 is black .", max_length=n_prompt + 2)
    assert len(example["input_ids"]) == n_prompt + 2
    with pytest.raises(ValueError, match="max_length"):
        data.tokenize_qa(tokenizer, "what is the look of item3 ?", "item3 is black .", max_length=n_prompt)


def test_padding_labels_and_masks():
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    right = data.pad_examples(examples, pad_token_id=0)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    left = data.pad_examples(examples, pad_token_id=0, side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    # A pad id that is also a real label (pad == eos) is still labelled where it is a real token, and, as
    # open-unlearning's collator builds the mask (input_ids != pad_token_id), never attended to.
    examples = [{"input_ids": [5, 3, 3], "labels": [-100, -100, 3]}, {"input_ids": [4], "labels": [4]}]
    same = data.pad_examples(examples, 3)
    assert same["labels"].tolist() == [[-100, -100, 3], [4, -100, -100]]
    assert same["attention_mask"].tolist() == [[1, 0, 0], [1, 0, 0]]
    left = data.pad_examples([{"input_ids": [5, 3, 6]}, {"input_ids": [7]}], 3, side="left")
    assert left["attention_mask"].tolist() == [[1, 0, 1], [0, 0, 1]]


def test_forget_retain_pairing_is_seeded_per_epoch_and_collates():
    forget = [{"input_ids": [1, i], "labels": [-100, i]} for i in range(6)]
    retain = [{"input_ids": [2, 10 + i, 3], "labels": [-100, 10 + i, 3]} for i in range(50)]
    dataset = data.ForgetRetainDataset(forget, retain, seed=7)
    epoch0 = [dataset[i]["retain"]["input_ids"][1] for i in range(6)]
    assert epoch0 == [data.ForgetRetainDataset(forget, retain, seed=7)[i]["retain"]["input_ids"][1] for i in range(6)]
    dataset.set_epoch(1)
    assert [dataset[i]["retain"]["input_ids"][1] for i in range(6)] != epoch0
    batch = data.ForgetRetainCollator(pad_token_id=0)([dataset[0], dataset[1]])
    assert set(batch) == {"forget", "retain"}
    assert batch["forget"]["input_ids"].shape == (2, 2) and batch["retain"]["labels"].shape == (2, 3)
    dataset.set_beliefs([[{"input_ids": [1, 9], "labels": [-100, 9]}] * 3 for _ in range(6)])
    batch = data.ForgetRetainCollator(pad_token_id=0)([dataset[0], dataset[1]])
    assert batch["beliefs"]["input_ids"].shape == (6, 2)
    with pytest.raises(ValueError, match="forget set is empty"):
        data.ForgetRetainDataset([], retain)


def test_tofu_files_load(tofu_dir):
    forget = data.load_qa_jsonl(tofu_dir / "forget01.jsonl")
    assert len(forget) == 40 and "perturbed_answer" in forget.column_names
    retain = data.load_qa_jsonl(tofu_dir / "retain99.jsonl", max_examples=200)
    assert len(retain) == 200
    assert json.loads((tofu_dir / "forget01.jsonl").read_text().splitlines()[0])["answer"] == forget[0]["answer"]
    assert isinstance(torch.tensor(0), torch.Tensor)
