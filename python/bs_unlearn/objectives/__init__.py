"""Unlearning objectives: a method's loss on a ``{"forget", "retain"[, "beliefs"]}`` batch (docs/math.md,
"Objectives"); minimised.

Building blocks, lowest first:
- ``objectives.terms``: terms on per-token quantities (GA, NPO, NLL, KL) and the answer mask;
- ``objectives.model_terms``: terms of a causal LM on a batch, by default without its [B, T, V] logits (the BS-T
  forget term ``bs_t_forget_loss``, per-token answer log-probs, the stock NLL); the drop-ins use them too.

    forget terms:  ga    mean log p(y)                                        (token mean by default)
                   bs_t  mean <t, log pi>, t = lam * q_topk + (1 - lam) * e_y  (sequence mean by default)
                   npo   (2 / beta) * mean_seq log(1 + exp(beta * (log p_theta(y|x) - log p_ref(y|x))))
                   bs_s  (1 - lam_s) * L_base(forget) + lam_s * L_base(beliefs), L_base one of the above
    retain terms:  nll   -mean log p(y) on retain answers
                   kl    mean over retain answer positions of KL(pi_ref || pi_theta)
    method loss:   forget_weight * forget term + retain_weight * retain term   (GradDiff's gamma and alpha)
"""

from __future__ import annotations

import torch

from ..config import DEFAULT_REDUCTION, FORGET_OBJECTIVES, METHODS, RETAIN_OBJECTIVES, ObjectiveConfig
from .model_terms import answer_logprob_loss, answer_token_logprobs, bs_t_forget_loss, fused_labelled_calls, logits_of
from .terms import answer_mask, ga_loss, kl_loss, masked_token_mean, nll_loss, npo_loss

__all__ = [
    "DEFAULT_REDUCTION",
    "FORGET_OBJECTIVES",
    "METHODS",
    "RETAIN_OBJECTIVES",
    "ObjectiveConfig",
    "UnlearnObjective",
    "answer_logprob_loss",
    "answer_mask",
    "answer_token_logprobs",
    "bs_t_forget_loss",
    "fused_labelled_calls",
    "ga_loss",
    "kl_loss",
    "logits_of",
    "nll_loss",
    "npo_loss",
]


class UnlearnObjective:
    """Turns a ``{"forget", "retain"[, "beliefs"]}`` batch into the method's scalar loss and logged metrics.

    ``model`` may be wrapped (DDP etc.): it is only called. ``ref_model`` is the frozen reference (NPO, KL).
    ``impl`` is the bs_kernels backend; ``fused_linear`` computes the per-token terms from the last hidden state and
    the lm_head weight in row chunks (no [B, T, V] logits; the KL retain term still needs both full distributions),
    where ``bs_kernels.patch_causal_lm`` supports the model (else the materialised logits, with the same values).
    """

    def __init__(self, config: ObjectiveConfig, *, impl: str = "auto", fused_linear: bool = True) -> None:
        # The options are checked once, by config.validate() before a run (UnlearnConfig) or by bs_kernels at the
        # first loss, with the same messages.
        self.config = config
        self.impl = impl
        self.fused_linear = fused_linear

    def token_logprobs(self, model, batch: dict) -> torch.Tensor:
        return answer_token_logprobs(model, batch, impl=self.impl, fused=self.fused_linear)

    def _forget_set_loss(self, model, ref_model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss of the forget objective on one set, detached per-token log-probs [B, T'] for logging)."""
        cfg = self.config
        mask = answer_mask(batch["labels"])
        name = cfg.forget_objective
        if name == "bs_t":
            loss, stats = bs_t_forget_loss(
                model,
                batch,
                lam=cfg.lam,
                top_k=cfg.top_k,
                belief_temperature=cfg.belief_temperature,
                reduction=cfg.forget_reduction or DEFAULT_REDUCTION["bs_t"],
                impl=self.impl,
                return_stats=True,
                fused=self.fused_linear,
            )
            return loss, stats.token_logprobs.detach()
        token_logprobs = self.token_logprobs(model, batch)
        if name == "ga":
            loss = ga_loss(token_logprobs, mask, reduction=cfg.forget_reduction or DEFAULT_REDUCTION["ga"])
        else:  # npo
            with torch.no_grad():
                ref_token_logprobs = self.token_logprobs(ref_model, batch)
            loss = npo_loss(token_logprobs, ref_token_logprobs, mask, beta=cfg.beta)
        return loss, token_logprobs.detach()

    def __call__(self, model, batch: dict, ref_model=None) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config
        if cfg.needs_reference and ref_model is None:
            raise ValueError(f"method {cfg.method!r} with retain_loss={cfg.retain_loss!r} needs a reference model")
        forget_loss, forget_lp = self._forget_set_loss(model, ref_model, batch["forget"])
        metrics = {
            "forget_logprob": masked_token_mean(forget_lp, answer_mask(batch["forget"]["labels"])),
            "forget_loss": float(forget_loss.detach()),
        }
        if cfg.uses_beliefs:
            if "beliefs" not in batch:
                raise ValueError("bs-s needs belief sequences in the batch (attach them with sample_beliefs)")
            belief_loss, belief_lp = self._forget_set_loss(model, ref_model, batch["beliefs"])
            metrics["belief_loss"] = float(belief_loss.detach())
            metrics["belief_logprob"] = masked_token_mean(belief_lp, answer_mask(batch["beliefs"]["labels"]))
            forget_loss = (1.0 - cfg.lam_s) * forget_loss + cfg.lam_s * belief_loss
        loss = cfg.forget_weight * forget_loss
        if cfg.retain_loss is not None:
            if "retain" not in batch:
                raise ValueError(f"retain_loss={cfg.retain_loss!r} needs a retain set")
            retain = batch["retain"]
            if cfg.retain_loss == "nll":
                retain_loss = nll_loss(self.token_logprobs(model, retain), answer_mask(retain["labels"]))
            else:
                with torch.no_grad():
                    ref_logits = logits_of(ref_model, retain)
                retain_loss = kl_loss(logits_of(model, retain), ref_logits, retain["labels"])
            metrics["retain_loss"] = float(retain_loss.detach())
            loss = loss + cfg.retain_weight * retain_loss
        return loss, metrics
