"""`flow_dppo`: Flow-DPPO, Divergence Proximal Policy Optimization for flow matching models
(arXiv 2606.11025; code: Tencent-Hunyuan/UniRL `unirl/algorithms/flowdppo.py`, verl-omni
`FlowDPPOLoss`).

PPO's ratio clip is a single-noise-sample proxy for how far π_θ has moved from π_old. A flow SDE
step is a Gaussian with a weight-independent variance, so the divergence itself is exact and cheap
(paper Eq. 14 as UniRL's README numbers it, for N(μ_old, s²I) and N(μ_θ, s²I), s = s_t·√|dt| the kernel's std):

    KL(π_old ‖ π_θ) = ‖μ_θ − μ_old‖² / (2 s²),      D_t = mean_D (μ_θ − μ_old)² / (2 s²)  (= KL / D)

D_t is mean-reduced as in both public implementations, so δ = `objective.dppo_threshold` is per
latent dimension (UniRL's SD3.5-M recipe: 1e-5). The surrogate is Flow-GRPO's ratio without the
clip, masked only where the step has left the trust region *and* keeps moving away from π_old in
the advantage's direction (paper Eq. 18):

    ρ_t = exp(log π_θ − log π_old)
    drop_t = (D_t ≥ δ) ∧ [(ρ_t > 1 ∧ A > 0) ∨ (ρ_t < 1 ∧ A < 0)]
    ℓ_t = −w·A·ρ_t·1[¬drop_t] + β·KL_ref

Corrective updates (inside the region, or moving back) always pass. D and the mask carry no
gradient. w is OP-GRPO's weight of a replayed row (1 for fresh rows); KL_ref is Flow-GRPO's term to
the reference (loss.kl_beta; the recipe: off). μ_old: `step_means.py`. On policy D = 0 and ρ = 1.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from flowpo.objectives.step_means import StepMeansSurrogate, mean_gap
from flowpo.stats import scalar


class DPPOStats(NamedTuple):
    """Detached 0-dim sums over the transitions given (flowpo.stats)."""

    count: torch.Tensor
    ratio_sum: torch.Tensor
    ratio_max: torch.Tensor
    divergence_sum: torch.Tensor   # Σ D_t
    divergence_max: torch.Tensor
    outside: torch.Tensor          # transitions with D_t ≥ δ
    masked: torch.Tensor           # transitions dropped
    policy_loss_sum: torch.Tensor
    kl_sum: torch.Tensor

    METRICS = {"ratio_sum": ("stats/ratio_mean", "sum"), "ratio_max": ("stats/ratio_max", "max"),
               "divergence_sum": ("stats/dppo_kl_mean", "sum"), "divergence_max": ("stats/dppo_kl_max", "max"),
               "outside": ("stats/dppo_outside_frac", "sum"), "masked": ("stats/clipfrac", "sum"),
               "policy_loss_sum": ("loss/policy", "sum"), "kl_sum": ("loss/kl", "sum")}


def dppo_loss(log_prob, old_log_prob, mean, old_mean, std, adv, threshold: float):
    """Per-transition Flow-DPPO loss (without weights and KL) → (loss [m], ρ [m], D [m], drop [m]).
    log_prob, old_log_prob, std, adv: [m]; mean, old_mean: [m, *D]."""
    ratio = torch.exp(log_prob - old_log_prob)
    with torch.no_grad():
        div = mean_gap(mean, old_mean, std, "mean")
        r = ratio.detach()
        drop = (div >= threshold) & (((r > 1) & (adv > 0)) | ((r < 1) & (adv < 0)))
    per = torch.where(drop, torch.zeros_like(ratio), -adv * ratio)
    return per, ratio, div, drop


class FlowDPPO(StepMeansSurrogate):
    """objective.kind=flow_dppo; options objective.dppo_threshold, loss.kl_beta."""

    Stats = DPPOStats

    def _surrogate(self, b, st, ids, t: int, rows, kl, count: float):
        per, ratio, div, drop = dppo_loss(st.log_prob[rows], b.old_log_probs[ids, t][rows], st.mean[rows],
                                          self.old_mean(st, ids, t, rows), st.std[rows], b.adv[ids, t][rows],
                                          self.o.dppo_threshold)
        per, total, kl_total = self.weighted_total(b, per, ids, t, rows, kl)
        r = ratio.detach()
        stat = DPPOStats(scalar(r.numel(), r), scalar(r.sum(), r), scalar(r.max() if r.numel() else 1.0, r),
                         scalar(div.sum(), r), scalar(div.max() if div.numel() else 0.0, r),
                         scalar((div >= self.o.dppo_threshold).sum(), r), scalar(drop.sum(), r),
                         scalar(per.detach().sum(), r), scalar(kl_total.detach(), r))
        return total / count, stat
