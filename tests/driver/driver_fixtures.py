"""Offline fixtures for the bs_unlearn driver tests: a tiny word-level tokenizer, a tiny random Llama, QA files.

Nothing is downloaded: the tokenizer is built with ``tokenizers`` from a fixed word list and the model from a
config. Answers all have the same number of tokens, so token means and sequence means agree across any split of a
batch (the DDP test relies on that).
"""

from __future__ import annotations

import json
import pathlib

import pytest

COLORS = ["red", "blue", "green", "black", "white", "gray"]
SHAPES = ["round", "square", "flat", "tall", "thin", "long"]
NUM_ITEMS = 24
SPECIALS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]


def _words() -> list[str]:
    words = ["Question", "Answer", ":", "?", ".", "what", "is", "the", "look", "of", "and", "it"]
    words += [f"item{i}" for i in range(NUM_ITEMS)] + COLORS + SHAPES
    return words


def qa_rows(indices) -> list[dict]:
    """One QA row per item index; every answer is 'itemN is COLOR and SHAPE .' (6 words)."""
    rows = []
    for i in indices:
        color, shape = COLORS[i % len(COLORS)], SHAPES[(i // len(COLORS)) % len(SHAPES)]
        rows.append(
            {
                "question": f"what is the look of item{i} ?",
                "answer": f"item{i} is {color} and {shape} .",
                "paraphrased_answer": f"it is {shape} and {color} .",
                "perturbed_answer": [f"item{i} is {COLORS[(i + 1) % 6]} and {shape} ."],
            }
        )
    return rows


def write_jsonl(path: pathlib.Path, rows: list[dict]) -> pathlib.Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def build_tokenizer():
    """A word-level PreTrainedTokenizerFast with [PAD]/[UNK]/[BOS]/[EOS] and no chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIALS + _words())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", vocab["[BOS]"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]"
    )


def build_model(tokenizer, seed: int = 0):
    """A 2-layer LlamaForCausalLM (hidden 32) with random weights, float32."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


def make_tiny_setup(folder: pathlib.Path) -> dict[str, pathlib.Path]:
    """Save the tiny model + tokenizer to folder/model and write forget (8), retain (16) QA files."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    model_dir = folder / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    forget = write_jsonl(folder / "forget.jsonl", qa_rows(range(8)))
    retain = write_jsonl(folder / "retain.jsonl", qa_rows(range(8, NUM_ITEMS)))
    return {"model": model_dir, "forget": forget, "retain": retain}


@pytest.fixture(scope="session")
def tiny_setup(tmp_path_factory) -> dict[str, pathlib.Path]:
    return make_tiny_setup(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture
def tiny_model(tiny_tokenizer):
    return build_model(tiny_tokenizer)
