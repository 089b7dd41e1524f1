"""Seeded fuzzing: random small shapes and options, every impl against the float64 reference (values, per-token
log-probs and gradients), within the TOLERANCES table.

Each case draws B, T, V, k (including k >= V), lam (including 0 and 1), the belief temperature, the reduction,
shift, detach_belief, the dtype (float64 or float32), an ignore pattern (prompt prefix, scattered, a fully ignored
sequence, nothing counted at all) and a -inf mask over part of the vocabulary. The cases are fixed by FUZZ_SEED, so
a failure names a case that reproduces; under the Triton interpreter only the first TRITON_CASES run (each call is
slow there).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import pytest
import torch
from conftest import TOLERANCES

from bs_kernels import bs_token_loss

FUZZ_SEED = 15
CASES = 48
TRITON_CASES = 4
REDUCTIONS = ("sequence_mean", "token_mean", "sum", "none")


@dataclass(frozen=True)
class FuzzCase:
    seed: int
    batch: int
    length: int
    vocab: int
    top_k: int
    lam: float
    belief_temperature: float
    reduction: str
    shift: bool
    detach_belief: bool
    dtype: torch.dtype
    ignore: str  # "prefix", "scattered", "one_sequence", "all"
    masked_fraction: float  # of the vocabulary set to -inf at each position (never the position's label)


def _draw(index: int) -> FuzzCase:
    rng = random.Random(FUZZ_SEED * 1000 + index)
    vocab = rng.choice([2, 3, 7, 31, 64, 65, 130])
    return FuzzCase(
        seed=index,
        batch=rng.randint(1, 3),
        length=rng.randint(2, 7),
        vocab=vocab,
        top_k=rng.choice([1, 2, max(1, vocab // 3), vocab, vocab + 3]),
        lam=rng.choice([0.0, 1.0, round(rng.uniform(0.0, 1.0), 3)]),
        belief_temperature=rng.choice([1.0, round(rng.uniform(0.3, 3.0), 3)]),
        reduction=rng.choice(REDUCTIONS),
        shift=rng.random() < 0.7,
        detach_belief=rng.random() < 0.5,
        dtype=rng.choice([torch.float64, torch.float32]),
        ignore=rng.choices(["prefix", "scattered", "one_sequence", "all"], weights=[4, 4, 2, 1])[0],
        masked_fraction=rng.choice([0.0, 0.0, 0.3, 0.8]),
    )


FUZZ_CASES = [_draw(index) for index in range(CASES)]


def _inputs(case: FuzzCase):
    generator = torch.Generator().manual_seed(FUZZ_SEED * 1000 + case.seed)
    shape = (case.batch, case.length)
    logits = torch.randn(*shape, case.vocab, generator=generator, dtype=torch.float64) * 4
    labels = torch.randint(0, case.vocab, shape, generator=generator)
    if case.ignore == "prefix":
        labels[:, : min(2, case.length - 1)] = -100
    elif case.ignore == "scattered":
        labels[torch.rand(shape, generator=generator) < 0.4] = -100
    elif case.ignore == "one_sequence":
        labels[0] = -100
    else:
        labels[:] = -100
    if case.masked_fraction > 0:
        masked = torch.rand(logits.shape, generator=generator) < case.masked_fraction
        # The label each position predicts stays finite (a -inf label logit is covered by test_hardening.py).
        predicted = torch.cat([labels[:, 1:], labels[:, :1]], dim=1) if case.shift else labels
        masked.scatter_(-1, predicted.clamp(min=0).unsqueeze(-1), False)
        logits = logits.masked_fill(masked, float("-inf"))
    upstream = torch.rand(shape, generator=generator, dtype=torch.float64) + 0.5  # weights for reduction="none"
    return logits.to(case.dtype), labels, upstream


def _run(case: FuzzCase, impl: str, logits: torch.Tensor, labels: torch.Tensor, upstream: torch.Tensor):
    source = logits.detach().clone().requires_grad_(True)
    loss, stats = bs_token_loss(
        source,
        labels,
        lam=case.lam,
        top_k=case.top_k,
        belief_temperature=case.belief_temperature,
        reduction=case.reduction,
        shift=case.shift,
        detach_belief=case.detach_belief,
        impl=impl,
        return_stats=True,
    )
    if case.reduction == "none":
        weights = upstream[:, : loss.shape[1]].to(loss.dtype)
        (loss * weights).sum().backward()
    else:
        loss.backward()
    return loss.detach(), stats.token_logprobs, source.grad


def _fuzz_params():
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"  # then only impl="triton" runs (-k triton)
    cases = FUZZ_CASES[:TRITON_CASES] if interpreted else FUZZ_CASES
    return [pytest.param(case, id=f"case{case.seed}") for case in cases]


@pytest.mark.parametrize("case", _fuzz_params())
def test_fuzz_against_reference(impl, case):
    logits, labels, upstream = _inputs(case)
    expected = _run(case, "reference", logits.double(), labels, upstream)
    actual = _run(case, impl, logits, labels, upstream)
    tolerance = TOLERANCES[case.dtype]
    for name, value, reference in zip(("loss", "token_logprobs", "grad"), actual, expected):
        assert value.dtype == case.dtype, (name, value.dtype)
        torch.testing.assert_close(
            value.double(), reference, **tolerance, msg=lambda text, name=name: f"{case}: {name}: {text}"
        )
    if case.ignore == "all":
        assert actual[0].abs().sum() == 0 and (actual[2] == 0).all()
