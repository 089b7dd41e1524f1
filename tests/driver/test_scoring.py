"""The model-facing scorers on a tiny random model: EM from the fused top-k, ES without generating, the shared
left-padded generation helper and the seeded leak-rate samples."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from bs_unlearn import generation, metrics, scoring  # noqa: E402
from bs_unlearn.data import pad_examples, tokenize_prompt, tokenize_qa  # noqa: E402
from bs_unlearn.fused import fused_supported  # noqa: E402
from bs_unlearn.tiny_model import build_tiny_model, build_tiny_tokenizer  # noqa: E402
from conftest import TOLERANCES  # noqa: E402

from bs_kernels import IGNORE_INDEX  # noqa: E402

QUESTIONS = ["Where was Ada born?", "What does Bo paint?", "Who coached Cy?"]
ANSWERS = ["Ada was born in Lund.", "Bo paints red boats on the river.", "Cy was coached by Dag Lind."]


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tiny_tokenizer(QUESTIONS + ANSWERS)
    return build_tiny_model(tokenizer, hidden_size=32), tokenizer


def _encoding(prompt: list[int], answer: list[int]) -> dict:
    return {"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer}


def _constructed_encodings(model, tokenizer) -> tuple[list[dict], list[int]]:
    """Answers that are partly the model's own greedy output: m arbitrary words, then the greedy continuation of
    prompt + those words (so ES is non-trivial: k <= m), plus the gold answers (k = T almost surely)."""
    stops = scoring.stop_token_ids(tokenizer, model)
    words = [tokenizer.convert_tokens_to_ids(w) for w in ("red", "Lund", "the", "boats")]
    prompts, prefixes = [], []
    for question in QUESTIONS:
        for m in range(4):
            prompts.append(tokenize_prompt(tokenizer, question))
            prefixes.append(words[:m])
    continuations = generation.generate_continuations(
        model,
        [p + w for p, w in zip(prompts, prefixes)],
        pad_id=scoring.pad_token_id(tokenizer),
        stop_ids=stops,
        batch_size=5,
        max_new_tokens=6,
    )
    encodings = [_encoding(p, w + c[0]) for p, w, c in zip(prompts, prefixes, continuations)]
    encodings += [tokenize_qa(tokenizer, q, a) for q, a in zip(QUESTIONS, ANSWERS)]
    return encodings, [len(w) for w in prefixes] + [None] * len(QUESTIONS)


def _scored_answer(encoding: dict, stops: set[int]) -> tuple[list[int], list[int]]:
    """(prompt, answer tokens that EM / ES score: the answer without a final stop token)."""
    start = next(i for i, label in enumerate(encoding["labels"]) if label != IGNORE_INDEX)
    answer = encoding["input_ids"][start:]
    if answer and answer[-1] in stops:
        answer = answer[:-1]
    return encoding["input_ids"][:start], answer


def test_em_from_fused_top_k_equals_argmax_of_materialised_logits(tiny):
    model, tokenizer = tiny
    stops = set(scoring.stop_token_ids(tokenizer, model))
    encodings, _ = _constructed_encodings(model, tokenizer)
    scores = scoring.score_encodings(model, tokenizer, encodings, batch_size=4, memorization=True)
    assert any(m.any() for m in scores.argmax_match) and not all(m.all() for m in scores.argmax_match)
    for encoding, matches, count in zip(encodings, scores.argmax_match, scores.num_tokens):
        prompt, answer = _scored_answer(encoding, stops)
        ids = torch.tensor([encoding["input_ids"]])
        with torch.no_grad():
            argmax = model(input_ids=ids).logits[0].argmax(-1)  # argmax at position t predicts token t + 1
        expected = [int(argmax[len(prompt) + j - 1]) == token for j, token in enumerate(answer)]
        assert matches.tolist() == expected
        assert metrics.exact_memorization(matches) == pytest.approx(np.mean(expected))
        # The final end-of-turn token is left out, as open-unlearning leaves out the eos prediction.
        assert len(matches) == count - (encoding["input_ids"][-1] in stops)


@pytest.mark.parametrize("top_k", [1, 4, 1000])
def test_argmax_matches_any_top_k(tiny, top_k):
    model, tokenizer = tiny
    encodings = [tokenize_qa(tokenizer, q, a) for q, a in zip(QUESTIONS, ANSWERS)]
    batch = pad_examples(encodings, scoring.pad_token_id(tokenizer))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"]
    # Make the label the argmax at some positions, so both outcomes occur.
    positions = torch.nonzero(labels[0, 1:] != IGNORE_INDEX).flatten()[:3]
    logits[0, positions, labels[0, positions + 1]] = 50.0
    matches = scoring.argmax_matches(logits, labels, top_k=top_k)
    expected = (logits[:, :-1].argmax(-1) == labels[:, 1:]) & (labels[:, 1:] != IGNORE_INDEX)
    assert matches.any()
    assert torch.equal(matches, expected)


def test_extraction_strength_fast_path_equals_explicit_greedy_generation(tiny):
    model, tokenizer = tiny
    stops = set(scoring.stop_token_ids(tokenizer, model))
    encodings, prefix_lengths = _constructed_encodings(model, tokenizer)
    scores = scoring.score_encodings(model, tokenizer, encodings, batch_size=3, memorization=True)
    # Explicit check: for every prefix length k, greedy-decode from prompt + answer[:k] (one batched, left-padded
    # generate call over all k of all answers) and see whether it reproduces answer[k:].
    cases, queries = [], []
    for encoding in encodings:
        prompt, answer = _scored_answer(encoding, stops)
        cases.append(answer)
        queries += [(len(cases) - 1, k, prompt + answer[:k]) for k in range(len(answer))]
    generated = generation.generate_continuations(
        model,
        [q[2] for q in queries],
        pad_id=scoring.pad_token_id(tokenizer),
        stop_ids=sorted(stops),
        batch_size=7,
        max_new_tokens=max(len(a) for a in cases),
    )
    shortest = [len(answer) for answer in cases]  # k = T: the empty rest is always reproduced
    for (case, k, _), continuation in zip(queries, generated):
        rest = cases[case][k:]
        if continuation[0][: len(rest)] == rest:
            shortest[case] = min(shortest[case], k)
    nontrivial = 0
    for matches, answer, k, m in zip(scores.argmax_match, cases, shortest, prefix_lengths):
        total = len(answer)
        assert metrics.extraction_strength(matches, convention="definition") == pytest.approx(1 - k / total)
        assert metrics.extraction_strength(matches) == pytest.approx(1 - min(k, total - 1) / total)
        if m is not None:
            assert k <= m  # the answer ends with the model's own greedy continuation
            nontrivial += 0 < k < total
    assert nontrivial > 0


def test_generate_continuations_batches_left_pads_and_cuts_at_stop(tiny):
    model, tokenizer = tiny
    stops = scoring.stop_token_ids(tokenizer, model)
    pad = scoring.pad_token_id(tokenizer)
    prompts = [tokenize_prompt(tokenizer, q) for q in QUESTIONS] + [tokenize_prompt(tokenizer, "Ada?")]
    model.train()
    batched = generation.generate_continuations(
        model,
        prompts,
        pad_id=pad,
        stop_ids=stops,
        batch_size=3,
        max_new_tokens=10,
        num_return_sequences=2,
        num_beams=2,
    )
    assert model.training  # the mode is restored
    assert len(batched) == len(prompts) and all(len(per_prompt) == 2 for per_prompt in batched)
    for prompt, per_prompt in zip(prompts, batched):
        alone = generation.generate_continuations(
            model,
            [prompt],
            pad_id=pad,
            stop_ids=stops,
            batch_size=1,
            max_new_tokens=10,
            num_return_sequences=2,
            num_beams=2,
        )
        assert per_prompt == alone[0]  # left padding does not change what a prompt gets
        for tokens in per_prompt:
            assert all(t not in stops for t in tokens[:-1])  # cut after the first stop id, which is kept


def _greedy_both_ways(model, prompts, pad, stops, *, batch_size, max_new_tokens, monkeypatch):
    """generate_continuations' greedy tokens by greedy_continuations (``generate`` made to fail) and by ``generate``
    (an extra kwarg that changes nothing, use_cache=True, sends it there)."""
    with monkeypatch.context() as patch:
        patch.setattr(model, "generate", lambda *a, **k: pytest.fail("plain greedy decoding called generate"))
        fast = generation.generate_continuations(
            model, prompts, pad_id=pad, stop_ids=stops, batch_size=batch_size, max_new_tokens=max_new_tokens
        )
    slow = generation.generate_continuations(
        model,
        prompts,
        pad_id=pad,
        stop_ids=stops,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        use_cache=True,
    )
    return fast, slow


@pytest.fixture(scope="module")
def lively(tiny):
    """The tiny model with seeded weights large enough that its greedy answers vary (the initialised one repeats a
    token)."""
    model, tokenizer = tiny
    model = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weight in (p for p in model.parameters() if p.dim() > 1):
            weight.copy_(torch.randn(weight.shape, generator=generator) * 0.3)
    return model, tokenizer


def test_greedy_rows_leave_the_batch_and_get_generates_tokens(lively, monkeypatch):
    model, tokenizer = lively
    pad = scoring.pad_token_id(tokenizer)
    # Prompts of different lengths, some holding the pad id (not attended, as in open-unlearning), so left padding,
    # the attention mask and the position ids all matter.
    prompts = [tokenize_prompt(tokenizer, q) for q in QUESTIONS + ["Ada?", "Bo paints red boats; who is Cy?"]]
    prompts[1] = prompts[1][:2] + [pad] + prompts[1][2:]
    free = generation.generate_continuations(model, prompts, pad_id=pad, stop_ids=[], batch_size=5, max_new_tokens=12)
    # Stops the rows emit at different steps (the first new token of one row, a later one of another), so rows leave
    # the batch one by one and some never stop.
    stops = sorted({free[3][0][1], free[0][0][9]})
    fast, slow = _greedy_both_ways(model, prompts, pad, stops, batch_size=5, max_new_tokens=12, monkeypatch=monkeypatch)
    assert fast == slow
    lengths = sorted(len(c[0]) for c in fast)
    assert lengths[0] < lengths[-2] and lengths[-1] == 12  # rows stopped at different steps; one ran to the cap
    # Batches smaller than the prompts, and a cap of one token.
    for batch_size, cap in ((2, 12), (5, 1)):
        fast, slow = _greedy_both_ways(
            model, prompts, pad, stops, batch_size=batch_size, max_new_tokens=cap, monkeypatch=monkeypatch
        )
        assert fast == slow


def test_greedy_with_a_logits_processor_goes_through_generate(tiny, monkeypatch):
    model, tokenizer = tiny
    prompts = [tokenize_prompt(tokenizer, q) for q in QUESTIONS]
    calls = []
    real = model.generate
    monkeypatch.setattr(model, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(model.generation_config, "repetition_penalty", 1.3)
    stops = scoring.stop_token_ids(tokenizer, model)
    pad = scoring.pad_token_id(tokenizer)
    generation.generate_continuations(model, prompts, pad_id=pad, stop_ids=stops, batch_size=3, max_new_tokens=4)
    assert calls == [1]  # the penalty is generate's to apply


def test_generate_answers_decodes_generate_continuations(tiny):
    model, tokenizer = tiny
    texts = generation.generate_answers(model, tokenizer, QUESTIONS, max_new_tokens=6, batch_size=2)
    tokens = generation.generate_continuations(
        model,
        [tokenize_prompt(tokenizer, q) for q in QUESTIONS],
        pad_id=scoring.pad_token_id(tokenizer),
        stop_ids=scoring.stop_token_ids(tokenizer, model),
        batch_size=2,
        max_new_tokens=6,
    )
    assert texts == [[tokenizer.decode(t[0], skip_special_tokens=True).strip()] for t in tokens]


def test_sample_answers_seeded_greedy_first_rng_restored(tiny):
    model, tokenizer = tiny
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    first = generation.sample_answers(model, tokenizer, QUESTIONS, num_samples=3, max_new_tokens=6, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    again = generation.sample_answers(model, tokenizer, QUESTIONS, num_samples=3, max_new_tokens=6, seed=5)
    other = generation.sample_answers(model, tokenizer, QUESTIONS, num_samples=3, max_new_tokens=6, seed=6)
    greedy = generation.generate_answers(model, tokenizer, QUESTIONS, max_new_tokens=6)
    assert first == again and first != other
    assert all(len(answers) == 4 for answers in first)
    assert [answers[:1] for answers in first] == greedy
    assert generation.sample_answers(model, tokenizer, QUESTIONS, num_samples=0, max_new_tokens=6) == greedy
    with pytest.raises(ValueError, match="temperature"):
        generation.sample_answers(model, tokenizer, QUESTIONS, num_samples=1, temperature=0.0)


@pytest.mark.parametrize("top_k", [1, 3, 10_000])
def test_fused_scoring_equals_materialised_logits(tiny, top_k):
    """The default (fused) scoring pass gives the materialised path's mean log-probs, token view and argmax matches
    within the float32 tolerance, for a top k of 1, a few, and more than the vocabulary."""
    model, tokenizer = tiny
    assert fused_supported(model)
    encodings, _ = _constructed_encodings(model, tokenizer)
    options = dict(batch_size=4, token_view_top_k=top_k, memorization=True)
    fused = scoring.score_encodings(model, tokenizer, encodings, **options)
    materialised = scoring.score_encodings(model, tokenizer, encodings, fused=False, **options)
    tolerance = TOLERANCES[torch.float32]
    for name in ("mean_logprob", "p_label", "alt_mass"):
        torch.testing.assert_close(
            torch.as_tensor(getattr(fused, name)), torch.as_tensor(getattr(materialised, name)), **tolerance, msg=name
        )
    assert fused.alt_mass.max() > 1e-3  # the alt mass is not trivially zero on both paths
    assert np.array_equal(fused.num_tokens, materialised.num_tokens)
    for got, expected in zip(fused.argmax_match, materialised.argmax_match):
        assert got.tolist() == expected.tolist()


def test_clean_up_tokenization_is_transformers_4s():
    # What open-unlearning's decoding does on transformers 4.x, for every tokenizer (5.x skips it for BPE ones).
    text = "Basil ' s father , born in 1956 . Do n't you 've seen ? I 'm sure ! They 're here ' s it"
    assert (
        generation.clean_up_tokenization(text)
        == "Basil's father, born in 1956. Don't you've seen? I'm sure! They're here's it"
    )
