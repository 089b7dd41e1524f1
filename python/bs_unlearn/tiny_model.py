"""A tiny randomly initialised Llama and a word-level tokenizer, built offline from a list of texts.

Used by ``bs-unlearn demo --quick`` and by the tests: it exercises every code path of the real model (Trainer,
generation, beam search, the fused log-probs) in seconds, with nothing downloaded. Its numbers mean nothing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_WORDS = re.compile(r"\w+|[^\w\s]")
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")


def build_tiny_tokenizer(texts: Iterable[str]):
    """A ``PreTrainedTokenizerFast`` whose vocabulary is the words and punctuation of ``texts`` plus the prompt
    words, with pad/unk/bos/eos tokens and no chat template (so prompts use the plain "Question: ... Answer:")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = {"Question", "Answer", ":"}
    for text in texts:
        words.update(_WORDS.findall(text))
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for word in sorted(words):
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def build_tiny_model(tokenizer, *, hidden_size: int = 64, layers: int = 2, seed: int = 0):
    """A randomly initialised ``LlamaForCausalLM`` sized for ``tokenizer`` (float32, eval-ready, ~100k parameters)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if hidden_size < 8 or hidden_size % 4:
        raise ValueError(f"hidden_size must be a multiple of 4 and >= 8, got {hidden_size}")
    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def build_quick_model(directory, records) -> str:
    """Save a tiny random Llama (hidden size 32) and a word-level tokenizer for the QA ``records`` in ``directory``
    (``bs-unlearn demo --quick``, the tests); returns its path. The vocabulary covers every text a record carries."""
    texts = []
    for record in records:
        texts += [record["question"], record["answer"]]
        texts += [record.get("paraphrased_answer") or "", record.get("paraphrased_question") or ""]
        texts += list(record.get("perturbed_answer") or [])
    tokenizer = build_tiny_tokenizer(texts)
    model = build_tiny_model(tokenizer, hidden_size=32)
    from .models import save_model_folder

    save_model_folder(model, tokenizer, directory)
    return str(directory)
