"""TOFU-format QA sets as the experiments use them: a split with its file, an evaluation set with its role, and the
layout of a TOFU folder.

    QASplit(name, records, path)      records and a JSON Lines file holding exactly them (what the trainers read)
    EvalSet(name, records, role)      what bs_unlearn.metrics evaluates; the role says which metrics a set gets
    tofu_eval_files(split)            (set name, file name, role) of the TOFU evaluation sets of a forget split
    tofu_eval_splits(split)           (set name, TOFU split name, role) of the same sets
    tofu_eval_sets(source, split)     those sets, loaded from any TOFU source (bs_unlearn.tofu_source): whole by
                                      default (forget split, retain_perturbed 400, real authors 100, world facts 117)
"""

from __future__ import annotations

import dataclasses
import pathlib

# Each TOFU forget split and the retain split that completes it to the whole data set.
TOFU_SPLITS = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}
EVAL_ROLES = ("forget", "retain", "options")


@dataclasses.dataclass
class QASplit:
    """A QA split: its records and a JSON Lines file holding exactly them (what the trainers read)."""

    name: str
    records: list[dict]
    path: pathlib.Path


@dataclasses.dataclass
class EvalSet:
    """One evaluation split: TOFU records (question, answer, optional paraphrased_answer / perturbed_answer /
    paraphrased_question, and ``keys``: the key strings of the fact, for the leak rate).

    role: "forget" (truth score = mean min(R, 1/R); gets the paper block), "retain" (mean max(0, 1 - R)), or
    "options" (real authors / world facts: probability normalised against the perturbed options, truth ratio
    against the gold answer). See docs/math.md, "Evaluation metrics".
    """

    name: str
    records: list[dict]
    role: str = "retain"

    def __post_init__(self) -> None:
        if self.role not in EVAL_ROLES:
            raise ValueError(f"role must be 'forget', 'retain' or 'options', got {self.role!r}")
        if not self.records:
            raise ValueError(f"evaluation set {self.name!r} is empty")
        for i, record in enumerate(self.records):
            if not isinstance(record.get("question"), str) or not isinstance(record.get("answer"), str):
                raise ValueError(f"evaluation set {self.name!r}: record {i} needs string 'question' and 'answer'")
            keys = record.get("keys")
            if keys is not None and (
                isinstance(keys, str) or not keys or not all(isinstance(k, str) and k.strip() for k in keys)
            ):
                raise ValueError(f"evaluation set {self.name!r}: record {i} 'keys' must be a non-empty list of strings")


def tofu_eval_files(split: str) -> list[tuple[str, str, str]]:
    """(set name, file name, role) of the TOFU evaluation sets of one forget split: the split (role forget),
    retain_perturbed (retain), real_authors_perturbed and world_facts_perturbed (options)."""
    return [
        (split, f"{split}.jsonl", "forget"),
        ("retain", "retain_perturbed.jsonl", "retain"),
        ("real_authors", "real_authors_perturbed.jsonl", "options"),
        ("world_facts", "world_facts_perturbed.jsonl", "options"),
    ]


def tofu_eval_splits(split: str) -> list[tuple[str, str, str]]:
    """(set name, TOFU split name, role) of the evaluation sets of one forget split (:func:`tofu_eval_files`)."""
    return [(name, file.removesuffix(".jsonl"), role) for name, file, role in tofu_eval_files(split)]


def tofu_eval_sets(
    source: str | pathlib.Path,
    split: str,
    *,
    max_examples: int | None = None,
    retain_examples: int | None = None,
    seed: int = 0,
) -> list[EvalSet]:
    """The TOFU evaluation sets of one forget split (:func:`tofu_eval_files`) from ``source`` (a JSON Lines folder, a
    local dataset folder or ``locuslab/TOFU`` in the HF cache: bs_unlearn.tofu_source.load_split). The forget split
    is always whole; ``retain_examples`` keeps a seeded subset of retain_perturbed, ``max_examples`` of the real
    authors and world facts; None keeps a set whole."""
    from .tofu_source import load_split  # imports torch (bs_unlearn.data): loaded when a command runs

    sizes = {"forget": None, "retain": retain_examples, "options": max_examples}
    return [
        EvalSet(name, load_split(source, split_name, max_examples=sizes[role], seed=seed), role)
        for name, split_name, role in tofu_eval_splits(split)
    ]
