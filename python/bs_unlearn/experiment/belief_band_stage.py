"""The belief band: the start model's beam-search answers other than the target, the squeezing probe's band."""

from __future__ import annotations

from collections.abc import Sequence

from ..probe import collect_belief_band


def belief_band_stage(model, tokenizer, forget: Sequence[dict], *, beams: int, max_new_tokens: int) -> list[dict]:
    """The start model's beam-search answers other than the target, per forget record (the squeezing probe's band)."""
    return collect_belief_band(
        model, tokenizer, forget, num_beams=beams, max_new_tokens=max_new_tokens, no_repeat_ngram_size=3
    )
