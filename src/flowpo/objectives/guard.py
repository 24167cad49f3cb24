"""`grpo_guard`: GRPO-Guard, Mitigating Implicit Over-Optimization in Flow Matching via Regulated
Clipping (Wang et al. 2025, arXiv 2510.22319; code in yifan123/flow_grpo,
`scripts/train_sd3_GRPO_Guard.py` and `config/grpo_guard.py`).

Flow-GRPO's per-step log-ratio, under the rollout's own noise x' = μ_old + s·z, is

    log ρ = log π_θ(x'|x) − log π_old(x'|x) = −reduce_D[(μ_θ − μ_old)·z]/s − reduce_D(μ_θ − μ_old)²/(2s²)

whose second term has no sign: it shifts the ratio's mean below 1 (most at the low-noise steps,
where s is small), so the clip [1 − ε, 1 + ε] stops constraining the positive-advantage updates, and
its spread depends on s. GRPO-Guard's two changes (the paper's §4; Eq. numbers: not available to us):

RatioNorm — add the bias back and take out the step's scale s = s_t·√|dt| (the kernel's std):

    b_t = reduce_D (μ_θ − μ_old)² / (2 s²)
    ρ̂_t = exp((log π_θ − log π_old + b_t) · s)  = exp(−reduce_D[(μ_θ − μ_old)·z])

Gradient reweight — each step's clipped loss divided by |dt| (`objective.guard_reweight`):

    ℓ_t = w · max(−A·ρ̂_t, −A·clip(ρ̂_t, 1 − ε, 1 + ε)) / |dt|   + β·KL_t

ε = loss.clip_range (their SD3.5-M configs: 2e-6 for OCR and GenEval, 4e-6 for PickScore), w the
OP-GRPO weight of a replayed row (1 for fresh rows), KL Flow-GRPO's (loss.kl_beta; their configs: 0).
b_t keeps its gradient (the authors' code does not detach it). reduce_D is the run's log-prob
reduction (sample.reduction: mean, as theirs). μ_old: `step_means.py`. On policy μ_θ = μ_old and
ρ̂ = 1 exactly. The code's s is the batch mean of its per-row scale; every row of a step shares it.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from flowpo.loss import ppo_clip
from flowpo.objectives.step_means import StepMeansSurrogate, mean_gap
from flowpo.stats import scalar


class GuardStats(NamedTuple):
    """Detached 0-dim sums over the transitions given (flowpo.stats)."""

    count: torch.Tensor
    ratio_sum: torch.Tensor        # Σ ρ̂ (the normalised ratio)
    ratio_max: torch.Tensor
    clipped: torch.Tensor          # transitions with |ρ̂ − 1| > ε
    raw_ratio_sum: torch.Tensor    # Σ exp(log π_θ − log π_old), Flow-GRPO's ratio
    bias_sum: torch.Tensor         # Σ b_t
    policy_loss_sum: torch.Tensor  # Σ ℓ_t without the KL
    kl_sum: torch.Tensor

    METRICS = {"ratio_sum": ("stats/ratio_mean", "sum"), "ratio_max": ("stats/ratio_max", "max"),
               "clipped": ("stats/clipfrac", "sum"), "raw_ratio_sum": ("stats/raw_ratio_mean", "sum"),
               "bias_sum": ("stats/guard_bias", "sum"), "policy_loss_sum": ("loss/policy", "sum"),
               "kl_sum": ("loss/kl", "sum")}


def guard_loss(log_prob, old_log_prob, mean, old_mean, std, adv, clip_range: float, dt: float, *,
               reduction: str = "mean", reweight: bool = True):
    """Per-transition GRPO-Guard loss (without weights and KL) → (loss [m], ρ̂ [m], b [m]).
    log_prob, old_log_prob, std, adv: [m]; mean, old_mean: [m, *D]."""
    bias = mean_gap(mean, old_mean, std, reduction)                       # b_t, with its gradient
    ratio = torch.exp((log_prob - old_log_prob + bias) * std)
    per = ppo_clip(ratio, adv, clip_range)
    if reweight:
        per = per / abs(dt)
    return per, ratio, bias


class GRPOGuard(StepMeansSurrogate):
    """objective.kind=grpo_guard; options loss.clip_range, loss.kl_beta, objective.guard_reweight."""

    Stats = GuardStats

    def _surrogate(self, b, st, ids, t: int, rows, kl, count: float):
        lc = self.loss
        old = b.old_log_probs[ids, t][rows]
        per, ratio, bias = guard_loss(st.log_prob[rows], old, st.mean[rows], self.old_mean(st, ids, t, rows),
                                      st.std[rows], b.adv[ids, t][rows], lc.clip_range,
                                      self.sig[t + 1] - self.sig[t], reduction=self.ctx.reduction,
                                      reweight=self.o.guard_reweight)
        per, total, kl_total = self.weighted_total(b, per, ids, t, rows, kl)
        r = ratio.detach()
        stat = GuardStats(scalar(r.numel(), r), scalar(r.sum(), r), scalar(r.max() if r.numel() else 1.0, r),
                          scalar(((r - 1).abs() > lc.clip_range).sum(), r),
                          scalar(torch.exp(st.log_prob[rows].detach() - old).sum(), r),
                          scalar(bias.detach().sum(), r), scalar(per.detach().sum(), r), scalar(kl_total.detach(), r))
        return total / count, stat
