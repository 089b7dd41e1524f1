"""The leak rate (docs/math.md, "Leak rate"): the fraction of a model's answers, greedy and sampled, to the forget
questions that still contain a key string of the fact; the matching of keys, and the sampling of the answers."""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

import numpy as np

from ..generation import sample_answers, temperature_samples
from ..prompts import PromptFormat


@functools.lru_cache(maxsize=4096)
def _key_pattern(key: str) -> re.Pattern:
    words = key.split()
    if not words:
        raise ValueError(f"a key must contain a non-space character, got {key!r}")
    body = r"\s+".join(re.escape(word) for word in words)
    # Whole words: a key that starts (ends) with a letter or digit must not continue a word on that side ("1861"
    # does not match "18610", "Wren" not "Wrens"); a key that starts or ends with punctuation is matched as written.
    before = r"(?<!\w)" if re.match(r"\w", words[0][0]) else ""
    after = r"(?!\w)" if re.match(r"\w", words[-1][-1]) else ""
    return re.compile(before + body + after, re.IGNORECASE)


def contains_key(text: str, keys: Sequence[str]) -> bool:
    """Whether ``text`` contains one of ``keys``: case-insensitive, whole words, any run of white space in a key
    matching any run in the text ("12 March  1861" matches "12 march 1861"); punctuation inside a key must match
    as written ("Al-Kuwaiti", "08/09/1956"), punctuation around it does not matter ("Skelmora." and "Skelmora's"
    contain "Skelmora")."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if isinstance(keys, str) or not keys:
        raise ValueError(f"keys must be a non-empty list of strings, got {keys!r}")
    return any(_key_pattern(key).search(text) is not None for key in keys)


def _checked_leak_inputs(answers, keys) -> None:
    if len(answers) != len(keys):
        raise ValueError(f"answers ({len(answers)} questions) and keys ({len(keys)}) must have the same length")
    if not answers:
        raise ValueError("leak rate needs at least one question")
    for i, (texts, question_keys) in enumerate(zip(answers, keys)):
        if isinstance(texts, str) or isinstance(question_keys, str):
            raise TypeError(f"question {i}: answers and keys must be lists of strings per question, not one string")
        if not texts:
            raise ValueError(f"question {i} has no answers")


def question_leak_rates(answers: Sequence[Sequence[str]], keys: Sequence[Sequence[str]]) -> list[float]:
    """Per question, the fraction of its answers that contain one of its keys (:func:`contains_key`)."""
    _checked_leak_inputs(answers, keys)
    return [float(np.mean([contains_key(t, k) for t in texts])) for texts, k in zip(answers, keys)]


def leak_rate(answers: Sequence[Sequence[str]], keys: Sequence[Sequence[str]]) -> float:
    """The leak rate: the fraction of all answers, pooled over questions, that still contain a key of their question.

    Args:
        answers: per question, the model's answers (e.g. greedy plus samples, :func:`generation.sample_answers`).
        keys: per question, the key strings that are the fact (the invented place, date, name).
    """
    _checked_leak_inputs(answers, keys)
    hits = [contains_key(t, k) for texts, k in zip(answers, keys) for t in texts]
    return float(np.mean(hits))


def measure_leak(
    model,
    tokenizer,
    records: Sequence[dict],
    *,
    num_samples: int,
    temperature: float,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    prompt_format: PromptFormat | None = None,
    greedy: list[str] | None = None,
) -> tuple[dict, dict]:
    """Leak rate of a set whose records carry keys: summary values and per-example answers / rates.

    ``prompt_format``: the prompts of the answers (:func:`generation.generate_answers`; the evaluation's).
    ``greedy``: the greedy answers to the original questions when they were just generated at the same length (they
    are reused instead of generated again; the samples are the same either way, seeded separately).
    """
    keys = [list(r["keys"]) for r in records]
    summary: dict = {"leak_samples": num_samples, "leak_temperature": temperature}
    per_example: dict = {}
    phrasings = [("original", [r["question"] for r in records])]
    if all(isinstance(r.get("paraphrased_question"), str) for r in records):
        phrasings.append(("paraphrased", [r["paraphrased_question"] for r in records]))
    pooled = []
    for offset, (name, questions) in enumerate(phrasings):
        sampling = dict(
            num_samples=num_samples,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            seed=seed + offset,
            batch_size=batch_size,
            prompt_format=prompt_format,
        )
        if name == "original" and greedy is not None:
            samples = temperature_samples(model, tokenizer, questions, **sampling)
            answers = [[first, *rest] for first, rest in zip(greedy, samples)]
        else:
            answers = sample_answers(model, tokenizer, questions, **sampling)
        rates = question_leak_rates(answers, keys)
        summary[f"leak_rate_{name}"] = float(np.mean(rates))
        per_example[name] = {"answers": answers, "rate": rates}
        pooled.extend(rates)
    # Every question has 1 + num_samples answers per phrasing, so the mean of the per-question rates is the pooled
    # fraction of answers.
    summary["leak_rate"] = float(np.mean(pooled))
    return summary, per_example
