"""The settings of a comparison of methods: what every unlearning run shares, and the sizes, steps and protocol of
the whole comparison. Light to import (the commands build their defaults from it at start-up)."""

from __future__ import annotations

import dataclasses
import math

from ..config import check_real


@dataclasses.dataclass
class UnlearnSettings:
    """What every run of one experiment shares: batch (forget examples, each with a retain partner), probe, BS-S
    sampling sizes, the seed."""

    batch_size: int = 4
    probe_every: int = 5
    probe_retain_records: int = 8
    top_k: int = 20
    bs_s_max_new_tokens: int = 24  # the demo's answers are at most 22 tokens with the end-of-turn token
    seed: int = 0


@dataclasses.dataclass
class ComparisonSettings:
    """Sizes, steps and the matched-forgetting protocol of a comparison of methods (the defaults: the demo's, which
    fit the 15-minute CPU budget with SmolLM2-135M)."""

    finetune_epochs: float = 4.0
    finetune_lr: float = 3e-4
    finetune_batch_size: int = 8
    unlearn_steps: int = 12  # the steps protocol's steps; the matched protocol's cap is max_steps
    unlearn_lr: float = 5e-5  # the steps protocol's lr
    unlearn: UnlearnSettings = dataclasses.field(default_factory=UnlearnSettings)  # batch, probe, BS-S sizes
    band_beams: int = 3
    band_max_new_tokens: int = 32
    eval_max_new_tokens: int = 24  # the demo's answers are at most 22 tokens with the end-of-turn token
    # matched forgetting
    target_lp: float = -3.0
    max_steps: int = 12  # the equal-steps demo's step count
    lr_grid: tuple[float, ...] = (1e-4, 3e-4)
    lr_search: str = "ascending"  # experiment.matched_stage: "all" tries every lr of the grid
    give_up: bool = True  # probe.ForgettingTarget.give_up: stop a run projected far short of the target
    leak_samples: int = 2
    # the losses and the probe's scoring from hidden states and the lm_head weight where the model supports it
    fused_linear: bool = True

    def __post_init__(self) -> None:
        """The float settings finite and in range (``--target-lp nan`` or ``--lr-grid inf`` would otherwise run the
        whole comparison for a target no run reaches, or on NaN weights)."""
        for name in ("finetune_epochs", "finetune_lr", "unlearn_lr"):
            check_real(name, getattr(self, name), low=0.0, low_open=True)
        for rate in self.lr_grid:
            check_real("lr_grid", rate, low=0.0, low_open=True)
        # A mean log-prob is < 0: a target above 0 would be "reached" before the first step.
        check_real("target_lp", self.target_lp, low=-math.inf, high=0.0)


PROTOCOLS = ("matched", "steps")
