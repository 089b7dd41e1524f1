"""TOFU-format QA data: loading, prompt formatting, tokenisation with prompt labels masked, and batching.

A QA file is JSON Lines with at least ``question`` and ``answer`` per line (TOFU adds ``paraphrased_answer`` and
``perturbed_answer``). Each example becomes ``input_ids`` = prompt + answer tokens and ``labels`` = -100 on the prompt
(and, after collation, on padding), so every loss counts answer tokens only.

Prompt format: the tokenizer's chat template when it has one (system turn and ``date_string`` of
``prompts.PromptFormat()``, the evaluation's, so that a model is trained on the prompts it is evaluated with; user
turn = question, assistant turn = answer, ended by the template's end-of-turn token), else
``"Question: {q}\\nAnswer:"`` followed by ``" {a}"`` and the eos token.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from bs_kernels import IGNORE_INDEX

from .prompts import PromptFormat, encode_prompt, encode_qa

# The chat prompts' system turn and date_string: the evaluation's defaults (open-unlearning's template arguments).
TRAINING_PROMPT_FORMAT = PromptFormat()

REQUIRED_FIELDS = ("question", "answer")
SCORED_FIELDS = ("paraphrased_answer", "perturbed_answer")  # what the truth ratio scores, where a set has them


def read_qa_records(path: str | os.PathLike, *, max_examples: int | None = None, seed: int = 0) -> list[dict]:
    """The records of a QA JSON Lines file, checked: every line a JSON object with string ``question`` and ``answer``.

    A bad line raises ValueError naming the file and line number. ``max_examples`` keeps a seeded random subset of
    that size, in file order (the same subset for the same seed, so fine-tuning and unlearning can share it).
    """
    path = pathlib.Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    if not path.is_file():
        raise ValueError(f"data path is not a file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read data file {path}: {error}") from error
    rows, places = [], []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        place = f"{path} line {line_number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{place}: not valid JSON ({error.msg})") from error
        rows.append(check_qa_record(row, place))
        places.append(place)
    if not rows:
        raise ValueError(f"data file {path} has no examples")
    check_scored_fields_shared(rows, places)
    return select_examples(rows, max_examples, seed=seed)


def check_qa_record(row: object, where: str) -> dict:
    """``row`` if it is a QA record (a dict with string ``question`` and ``answer``, all text valid Unicode; where
    present, ``paraphrased_answer`` a non-blank string and ``perturbed_answer`` a non-empty list of them), else
    ValueError starting with ``where`` (e.g. "FILE line N")."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object with question and answer")
    for field in REQUIRED_FIELDS:
        if not isinstance(row.get(field), str):
            raise ValueError(f"{where}: missing string field {field!r}")
    _check_scored_answers(row, where)
    for field, value in row.items():
        _check_encodable(value, f"{where}: field {field!r}")
    return row


def check_scored_fields_shared(rows: Sequence[dict], places: Sequence[str]) -> None:
    """Each of ``SCORED_FIELDS`` on every record or on none (``places[i]`` names record i in an error): a set whose
    records have it scores it for all of them, and one record without it would change the set's truth ratio."""
    for field in SCORED_FIELDS:
        missing = [place for row, place in zip(rows, places) if row.get(field) is None]
        if missing and len(missing) < len(rows):
            raise ValueError(f"{missing[0]}: no {field}, which the other records have (the metrics score it on all)")


def _is_text(value: object) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _check_scored_answers(row: dict, where: str) -> None:
    """The answers the truth ratio scores, checked as they are read: one record whose ``perturbed_answer`` is empty
    would leave its whole set without a truth ratio. A field that is absent or null (how a table marks a missing
    value) is not checked here; every TOFU file's records carry both fields complete or neither."""
    paraphrased = row.get("paraphrased_answer")
    if paraphrased is not None and not _is_text(paraphrased):
        raise ValueError(f"{where}: paraphrased_answer must be a non-empty string, got {paraphrased!r}")
    perturbed = row.get("perturbed_answer")
    if perturbed is not None and not (isinstance(perturbed, list) and perturbed and all(map(_is_text, perturbed))):
        raise ValueError(f"{where}: perturbed_answer must be a non-empty list of non-empty strings, got {perturbed!r}")


def select_examples(rows: list[dict], max_examples: int | None, *, seed: int = 0) -> list[dict]:
    """A seeded random subset of ``max_examples`` rows, in their order (all rows when None or enough)."""
    if max_examples is not None:
        if max_examples < 1:
            raise ValueError(f"max_examples must be >= 1, got {max_examples}")
        if max_examples < len(rows):
            keep = np.random.default_rng(seed).permutation(len(rows))[:max_examples]
            rows = [rows[i] for i in sorted(keep)]
    return rows


def _check_encodable(value: object, where: str) -> None:
    """Refuse a string that is not valid Unicode text: JSON's ``\\ud800`` escapes decode to a lone surrogate, which
    the tokenizer and every writer then fail on ("'utf-8' codec can't encode") without naming the file."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            code = f"\\u{ord(value[error.start]):04x}"
            raise ValueError(
                f"{where} holds a lone surrogate ({code} at character {error.start}), which is not valid text; "
                "fix that escape in the file"
            ) from None
    elif isinstance(value, list):
        for item in value:
            _check_encodable(item, where)
    elif isinstance(value, dict):
        for item in value.values():
            _check_encodable(item, where)


def load_qa_jsonl(path: str | os.PathLike, *, max_examples: int | None = None, seed: int = 0):
    """:func:`read_qa_records` as a ``datasets.Dataset`` (offline, local path only).

    Keeps the columns that every row shares in a uniform type (TOFU's optional fields differ between files).
    """
    import datasets

    rows = read_qa_records(path, max_examples=max_examples, seed=seed)
    columns = {"question": [r["question"] for r in rows], "answer": [r["answer"] for r in rows]}
    for optional in ("paraphrased_answer",):
        if all(isinstance(r.get(optional), str) for r in rows):
            columns[optional] = [r[optional] for r in rows]
    if all(isinstance(r.get("perturbed_answer"), list) for r in rows):
        columns["perturbed_answer"] = [[str(x) for x in r["perturbed_answer"]] for r in rows]
    return datasets.Dataset.from_dict(columns)


def demo_data_path(name: str) -> pathlib.Path:
    """Path of a file of the embedded demo data set (``forget.jsonl``, ``retain.jsonl``)."""
    return pathlib.Path(str(importlib.resources.files("bs_unlearn") / "demo_data" / name))


def write_qa_records(records: Sequence[dict], path: str | os.PathLike) -> pathlib.Path:
    """Write records as QA JSON Lines (e.g. a seeded subset that several stages must read identically)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")
    return path


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that end an answer: the eos token and, with a chat template, the token that closes an assistant turn.

    The end-of-turn token is read from the template itself (render an assistant turn and take the first token after
    its content), never from a hard-coded model-specific string.
    """
    ids = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    if getattr(tokenizer, "chat_template", None):
        marker = "\x1fBSU\x1f"
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}], tokenize=False
        )
        suffix = rendered.split(marker, 1)[1] if marker in rendered else ""
        suffix_ids = tokenizer(suffix, add_special_tokens=False)["input_ids"] if suffix else []
        if suffix_ids and int(suffix_ids[0]) in set(tokenizer.all_special_ids):
            ids.append(int(suffix_ids[0]))
    return sorted(set(ids))


def tokenize_prompt(tokenizer, question: str) -> list[int]:
    """The trainer's prompt token ids, where :func:`tokenize_qa`'s answers begin: with a chat template
    ``prompts.encode_prompt`` with TRAINING_PROMPT_FORMAT; without one "Question: ...\nAnswer:" with the tokenizer's
    special prefix tokens (e.g. bos) when it adds them."""
    if getattr(tokenizer, "chat_template", None):
        return encode_prompt(tokenizer, question, TRAINING_PROMPT_FORMAT)
    return list(tokenizer(f"Question: {question}\nAnswer:", add_special_tokens=True)["input_ids"])


def tokenize_qa(tokenizer, question: str, answer: str, *, max_length: int = 256) -> dict[str, list[int]]:
    """One example: ``input_ids`` = prompt + answer, ``labels`` = -100 on the prompt. Truncated to ``max_length``
    tokens from the answer's end (the prompt is kept whole).

    With a chat template it is open-unlearning's training sequence (``prompts.encode_qa`` with
    TRAINING_PROMPT_FORMAT): the answer is everything the template writes after the prompt (the answer, the turn's
    end token and what follows it, e.g. ChatML's newline) plus eos where the conversation does not end with one, so a
    fine-tuned model learns every token the evaluation scores. Without one: "Question: ...\nAnswer:", a space, the
    answer and eos.
    """
    if getattr(tokenizer, "chat_template", None):
        example = encode_qa(tokenizer, question, answer, TRAINING_PROMPT_FORMAT, max_length=max_length)
        input_ids, labels = example["input_ids"], example["labels"]
        prompt_length = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    else:
        prompt_ids = tokenize_prompt(tokenizer, question)
        answer_ids = list(tokenizer(" " + answer + (tokenizer.eos_token or ""), add_special_tokens=False)["input_ids"])
        input_ids = prompt_ids + answer_ids
        labels = [IGNORE_INDEX] * len(prompt_ids) + answer_ids
        prompt_length = len(prompt_ids)
    if max_length <= prompt_length:
        raise ValueError(f"max_length={max_length} leaves no room for the answer after a {prompt_length}-token prompt")
    return {"input_ids": input_ids[:max_length], "labels": labels[:max_length]}


def tokenize_dataset(dataset, tokenizer, *, max_length: int = 256) -> list[dict[str, list[int]]]:
    """Tokenise every row of a QA dataset (a list, small enough to keep in memory for unlearning-sized sets)."""
    return [tokenize_qa(tokenizer, q, a, max_length=max_length) for q, a in zip(dataset["question"], dataset["answer"])]


def pad_examples(examples: Sequence[dict], pad_token_id: int, *, side: str = "right") -> dict[str, torch.Tensor]:
    """Pad examples with ``input_ids``/``labels`` lists into ``input_ids``, ``attention_mask``, ``labels`` [B, T].

    Padding gets label -100 whatever the pad id is (the pad token may equal eos, which is a real label at the end of
    an answer). Attention is 0 on the padding and on every token equal to ``pad_token_id``, as open-unlearning's
    collator builds it (``input_ids != pad_token_id``) for training, scoring and generation alike: with pad = eos
    (SmolLM2; open-unlearning's choice for Llama 3) the end-of-turn tokens inside every sequence are not attended to,
    its numbers depend on it, and a model is trained the way it is evaluated (docs/math.md, "Evaluation protocol").
    """
    if not examples:
        raise ValueError("cannot pad an empty list of examples")
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    length = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        span = slice(0, n) if side == "right" else slice(length - n, length)
        input_ids[row, span] = torch.tensor(example["input_ids"], dtype=torch.long)
        attention_mask[row, span] = 1
        if "labels" in example:
            labels[row, span] = torch.tensor(example["labels"], dtype=torch.long)
    attention_mask *= (input_ids != pad_token_id).long()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class QADataset(torch.utils.data.Dataset):
    """Tokenised QA examples for fine-tuning (plain batches)."""

    def __init__(self, examples: list[dict[str, list[int]]]) -> None:
        if not examples:
            raise ValueError("the data set is empty")
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        return self.examples[index]


class ForgetRetainDataset(torch.utils.data.Dataset):
    """Indexed by the forget set; item i is ``{"forget": forget[i], "retain": a random retain example}``, plus
    ``"beliefs"`` (the BS-S belief sequences sampled for forget prompt i) once beliefs are attached.

    The retain partner of forget example i in epoch e is drawn from a generator seeded by (seed, e, i), so every
    process of a distributed run pairs identically and each epoch sees a fresh pairing (``set_epoch``).
    """

    def __init__(self, forget: list[dict], retain: list[dict] | None, *, seed: int = 0) -> None:
        if not forget:
            raise ValueError("the forget set is empty")
        if retain is not None and not retain:
            raise ValueError("the retain set is empty")
        self.forget = forget
        self.retain = retain
        self.seed = seed
        self.epoch = 0
        self.beliefs: list[list[dict]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_beliefs(self, beliefs: list[list[dict]]) -> None:
        if len(beliefs) != len(self.forget):
            raise ValueError(f"got beliefs for {len(beliefs)} prompts, the forget set has {len(self.forget)}")
        self.beliefs = beliefs

    def __len__(self) -> int:
        return len(self.forget)

    def __getitem__(self, index: int) -> dict:
        item = {"forget": self.forget[index]}
        if self.retain is not None:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            item["retain"] = self.retain[int(rng.integers(len(self.retain)))]
        if self.beliefs is not None:
            item["beliefs"] = self.beliefs[index]
        return item


@dataclass
class ForgetRetainCollator:
    """Collates ForgetRetainDataset items into ``{"forget": batch, "retain": batch[, "beliefs": batch]}``, each a
    right-padded ``{"input_ids", "attention_mask", "labels"}`` ([B, T]; beliefs [B * N, T'])."""

    pad_token_id: int

    def __call__(self, items: list[dict]) -> dict[str, dict[str, torch.Tensor]]:
        batch = {"forget": pad_examples([item["forget"] for item in items], self.pad_token_id)}
        if "retain" in items[0]:
            batch["retain"] = pad_examples([item["retain"] for item in items], self.pad_token_id)
        if "beliefs" in items[0]:
            batch["beliefs"] = pad_examples([b for item in items for b in item["beliefs"]], self.pad_token_id)
        return batch


@dataclass
class QACollator:
    """Collates QADataset items into one right-padded ``{"input_ids", "attention_mask", "labels"}`` batch."""

    pad_token_id: int

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        return pad_examples(items, self.pad_token_id)
