"""Unlearning objectives (SPEC.md, "Objectives around it"); every one is minimised.

Forget terms are functions of per-token quantities from bs_kernels — ``forget_logprobs`` (log p(label) per answer
token) or ``bs_token_loss(..., reduction="none")`` (the BS-T value per answer token) — never of a [B, T, V]
probability tensor. Retain terms: ``nll`` (from per-token log-probs) and ``kl`` (KL(pi_ref || pi_theta), computed in
row chunks by a small autograd Function so that no [B, T, V] softmax is materialised either).

    forget terms:  ga    mean log p(y)                                        (token mean by default)
                   bs_t  mean <t, log pi>, t = lam * q_topk + (1 - lam) * e_y  (sequence mean by default)
                   npo   (2 / beta) * mean_seq log(1 + exp(beta * (log p_theta(y|x) - log p_ref(y|x))))
                   bs_s  (1 - lam_s) * L_base(forget) + lam_s * L_base(beliefs), L_base one of the above
    retain terms:  nll   -mean log p(y) on retain answers
                   kl    mean over retain answer positions of KL(pi_ref || pi_theta)
    method loss:   forget_weight * forget term + retain_weight * retain term   (GradDiff's gamma and alpha)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import bs_kernels

from .data import IGNORE_INDEX

FORGET_OBJECTIVES = ("ga", "bs_t", "npo")
RETAIN_OBJECTIVES = ("nll", "kl")
REDUCTIONS = ("token_mean", "sequence_mean", "sum")

# method name -> (forget objective, default retain term). bs-s takes its base forget objective from the config.
METHODS = {
    "ga": ("ga", None),
    "graddiff": ("ga", "nll"),
    "npo": ("npo", "nll"),
    "bs-t": ("bs_t", "nll"),
    "bs-s": ("bs_s", "nll"),
}
DEFAULT_REDUCTION = {"ga": "token_mean", "bs_t": "sequence_mean"}


def answer_mask(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] labels -> [B, T - 1] bool: positions whose (shifted) label counts."""
    return labels[:, 1:] != IGNORE_INDEX


def masked_reduce(values: torch.Tensor, mask: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce per-position values [B, T'] (0 where ``mask`` is False) over the valid positions.

    token_mean: sum / number of valid positions; sequence_mean: mean per sequence, then mean over sequences with a
    valid position; sum: plain sum. A batch without valid positions gives 0.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    values = values * mask
    if reduction == "sum":
        return values.sum()
    if reduction == "token_mean":
        return values.sum() / mask.sum().clamp(min=1)
    counts = mask.sum(-1)
    per_sequence = values.sum(-1) / counts.clamp(min=1)
    return per_sequence.sum() / (counts > 0).sum().clamp(min=1)


def ga_loss(token_logprobs: torch.Tensor, mask: torch.Tensor, *, reduction: str = "token_mean") -> torch.Tensor:
    """Gradient ascent: the mean log p(y) over forget answer tokens ([B, T'] inputs). Minimising it forgets."""
    return masked_reduce(token_logprobs, mask, reduction)


def bs_t_loss(token_values: torch.Tensor, mask: torch.Tensor, *, reduction: str = "sequence_mean") -> torch.Tensor:
    """BS-T: the mean of per-token values <t, log pi> ([B, T'], from bs_token_loss(reduction="none"))."""
    return masked_reduce(token_values, mask, reduction)


def npo_loss(
    token_logprobs: torch.Tensor, ref_token_logprobs: torch.Tensor, mask: torch.Tensor, *, beta: float = 0.1
) -> torch.Tensor:
    """NPO: (2/beta) * mean over sequences of log(1 + (p_theta(y|x) / p_ref(y|x))^beta).

    Sequence log-probs are sums of per-token log-probs over the answer; log(1 + exp(x)) is softplus (stable for any
    x). Sequences without an answer token are left out of the mean.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    sequence_logprob = (token_logprobs * mask).sum(-1)
    ref_sequence_logprob = (ref_token_logprobs * mask).sum(-1)
    has_answer = mask.any(-1)
    per_sequence = F.softplus(beta * (sequence_logprob - ref_sequence_logprob)) * (2.0 / beta)
    return (per_sequence * has_answer).sum() / has_answer.sum().clamp(min=1)


def nll_loss(token_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Retain NLL: -mean log p(y) over retain answer tokens (the Hugging Face pooled mean)."""
    return -masked_reduce(token_logprobs, mask, "token_mean")


class _RowKL(torch.autograd.Function):
    """Per-row KL(softmax(ref) || softmax(z)) for selected rows, computed ``chunk`` rows at a time.

    Forward, per row:  KL = sum_v p_ref,v * (log p_ref,v - z_v + LSE(z)).
    Backward: dKL/dz_v = -p_ref,v + softmax(z)_v  (the p_ref log p_ref term does not depend on z; d LSE/dz = pi),
    recomputed chunk by chunk from the saved logits, so the only [rows, V] temporaries are chunk-sized.
    """

    @staticmethod
    def forward(ctx, logits, ref_logits, row_index, chunk):
        # logits, ref_logits: [N, V]; row_index: [M] int64 rows to use; returns [M] float32.
        out = torch.empty(row_index.numel(), dtype=torch.float32, device=logits.device)
        for start in range(0, row_index.numel(), chunk):
            rows = row_index[start : start + chunk]
            log_p = torch.log_softmax(logits[rows].float(), dim=-1)
            log_ref = torch.log_softmax(ref_logits[rows].float(), dim=-1)
            out[start : start + chunk] = (log_ref.exp() * (log_ref - log_p)).sum(-1)
        ctx.save_for_backward(logits, ref_logits, row_index)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_rows):
        logits, ref_logits, row_index = ctx.saved_tensors
        grad_logits = torch.zeros_like(logits)
        for start in range(0, row_index.numel(), ctx.chunk):
            rows = row_index[start : start + ctx.chunk]
            p = torch.softmax(logits[rows].float(), dim=-1)
            p_ref = torch.softmax(ref_logits[rows].float(), dim=-1)
            grad_logits[rows] = ((p - p_ref) * grad_rows[start : start + ctx.chunk, None]).to(logits.dtype)
        return grad_logits, None, None, None


def kl_loss(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor, *, chunk: int = 256) -> torch.Tensor:
    """Retain KL: mean over answer positions of KL(pi_ref || pi_theta).

    logits, ref_logits: [B, T, V] (ref_logits from the frozen reference model, no gradient); labels: [B, T]. As in
    the loss, logits at position t belong to label t + 1, so the positions used are those with a valid shifted label.
    """
    if logits.shape != ref_logits.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and ref_logits {tuple(ref_logits.shape)} differ in shape")
    vocab = logits.shape[-1]
    valid = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    valid[:, :-1] = answer_mask(labels)
    row_index = valid.reshape(-1).nonzero().squeeze(-1)
    if row_index.numel() == 0:
        return logits.sum() * 0.0
    rows_kl = _RowKL.apply(logits.reshape(-1, vocab), ref_logits.detach().reshape(-1, vocab), row_index, chunk)
    return rows_kl.mean()


@dataclass
class ObjectiveConfig:
    """Settings of one method's loss (defaults: SPEC.md)."""

    method: str = "graddiff"
    retain_loss: str | None = "default"  # "nll", "kl", None (no retain term) or "default" (the method's)
    forget_weight: float = 1.0  # gamma
    retain_weight: float = 1.0  # alpha
    lam: float = 0.2  # BS-T belief weight
    top_k: int = 20
    belief_temperature: float = 1.0
    beta: float = 0.1  # NPO
    lam_s: float = 0.5  # BS-S belief-set weight
    bs_s_base: str = "ga"  # BS-S base forget objective: ga (the authors' trainer), bs_t (the paper's best), npo
    forget_reduction: str | None = None  # None: token_mean for ga, sequence_mean for bs_t
    impl: str = "auto"
    # Compute per-token log-probs / BS-T values from the last hidden state and the lm_head weight in row chunks
    # (bs_unlearn.integrations.fused over bs_kernels' fused linear loss): no [B, T, V] logits at all. The KL retain
    # term needs both full distributions and keeps the materialised logits.
    fused_linear: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)}, got {self.method!r}")
        if self.retain_loss == "default":
            self.retain_loss = METHODS[self.method][1]
        if self.retain_loss not in (None, *RETAIN_OBJECTIVES):
            raise ValueError(f"retain_loss must be one of {RETAIN_OBJECTIVES} or None, got {self.retain_loss!r}")
        if self.bs_s_base not in FORGET_OBJECTIVES:
            raise ValueError(f"bs_s_base must be one of {FORGET_OBJECTIVES}, got {self.bs_s_base!r}")
        if self.forget_reduction is not None and self.forget_reduction not in REDUCTIONS:
            raise ValueError(f"forget_reduction must be one of {REDUCTIONS}, got {self.forget_reduction!r}")
        if not 0.0 <= self.lam_s <= 1.0:
            raise ValueError(f"lam_s must be in [0, 1], got {self.lam_s}")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        # lam, top_k, belief_temperature, impl: validated by bs_kernels with the same messages as the loss.
        bs_kernels.BSTokenLoss(
            lam=self.lam, top_k=self.top_k, belief_temperature=self.belief_temperature, impl=self.impl
        )

    @property
    def forget_objective(self) -> str:
        """The per-sequence-set forget objective (the base objective for bs-s)."""
        name = METHODS[self.method][0]
        return self.bs_s_base if name == "bs_s" else name

    @property
    def needs_reference(self) -> bool:
        return self.forget_objective == "npo" or self.retain_loss == "kl"

    @property
    def uses_beliefs(self) -> bool:
        return self.method == "bs-s"


def _logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits


def _fused():
    from .integrations import fused

    return fused


def token_logprobs_of(model, batch: dict[str, torch.Tensor], *, impl: str, fused_linear: bool) -> torch.Tensor:
    """Per-token log p(label) [B, T - 1] of a batch under ``model`` (0 where the shifted label is ignored)."""
    if fused_linear:
        return _fused().answer_token_logprobs(model, batch, impl=impl)
    return bs_kernels.forget_logprobs(_logits(model, batch), batch["labels"], impl=impl)


class UnlearnObjective:
    """Turns a ``{"forget", "retain"[, "beliefs"]}`` batch into the method's scalar loss and logged metrics.

    ``model`` may be wrapped (DDP etc.): it is only called. ``ref_model`` is the frozen reference (NPO, KL).
    """

    def __init__(self, config: ObjectiveConfig) -> None:
        self.config = config

    def _forget_set_loss(self, model, ref_model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss of the forget objective on one set, detached per-token log-probs [B, T'] for logging)."""
        cfg = self.config
        labels = batch["labels"]
        mask = answer_mask(labels)
        name = cfg.forget_objective
        if name == "bs_t":
            options = dict(lam=cfg.lam, top_k=cfg.top_k, belief_temperature=cfg.belief_temperature, impl=cfg.impl)
            if cfg.fused_linear:
                values, stats = _fused().bs_t_forget_loss(model, batch, reduction="none", return_stats=True, **options)
            else:
                values, stats = bs_kernels.bs_token_loss(
                    _logits(model, batch), labels, reduction="none", return_stats=True, **options
                )
            loss = bs_t_loss(values, mask, reduction=cfg.forget_reduction or DEFAULT_REDUCTION["bs_t"])
            return loss, stats.token_logprobs.detach()
        token_logprobs = token_logprobs_of(model, batch, impl=cfg.impl, fused_linear=cfg.fused_linear)
        if name == "ga":
            loss = ga_loss(token_logprobs, mask, reduction=cfg.forget_reduction or DEFAULT_REDUCTION["ga"])
        else:  # npo
            with torch.no_grad():
                ref_token_logprobs = token_logprobs_of(ref_model, batch, impl=cfg.impl, fused_linear=cfg.fused_linear)
            loss = npo_loss(token_logprobs, ref_token_logprobs, mask, beta=cfg.beta)
        return loss, token_logprobs.detach()

    def __call__(self, model, batch: dict, ref_model=None) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config
        if cfg.needs_reference and ref_model is None:
            raise ValueError(f"method {cfg.method!r} with retain_loss={cfg.retain_loss!r} needs a reference model")
        forget_loss, forget_lp = self._forget_set_loss(model, ref_model, batch["forget"])
        forget_mask = answer_mask(batch["forget"]["labels"])
        metrics = {
            "forget_logprob": float((forget_lp * forget_mask).sum() / forget_mask.sum().clamp(min=1)),
            "forget_loss": float(forget_loss.detach()),
        }
        if cfg.uses_beliefs:
            if "beliefs" not in batch:
                raise ValueError("bs-s needs belief sequences in the batch (attach them with sample_beliefs)")
            belief_loss, belief_lp = self._forget_set_loss(model, ref_model, batch["beliefs"])
            belief_mask = answer_mask(batch["beliefs"]["labels"])
            metrics["belief_loss"] = float(belief_loss.detach())
            metrics["belief_logprob"] = float((belief_lp * belief_mask).sum() / belief_mask.sum().clamp(min=1))
            forget_loss = (1.0 - cfg.lam_s) * forget_loss + cfg.lam_s * belief_loss
        loss = cfg.forget_weight * forget_loss
        if cfg.retain_loss is not None:
            if "retain" not in batch:
                raise ValueError(f"retain_loss={cfg.retain_loss!r} needs a retain set")
            retain = batch["retain"]
            if cfg.retain_loss == "nll":
                retain_token_logprobs = token_logprobs_of(model, retain, impl=cfg.impl, fused_linear=cfg.fused_linear)
                retain_loss = nll_loss(retain_token_logprobs, answer_mask(retain["labels"]))
            else:
                with torch.no_grad():
                    ref_logits = _logits(ref_model, retain)
                retain_loss = kl_loss(_logits(model, retain), ref_logits, retain["labels"])
            metrics["retain_loss"] = float(retain_loss.detach())
            loss = loss + cfg.retain_weight * retain_loss
        return loss, metrics
