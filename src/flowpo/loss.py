"""The clipped GRPO surrogate with importance weights and a KL to the reference policy.

Per trained transition (row i, step t), Flow-GRPO (arXiv 2505.05470, Eq. 5–6):

    ρ_{i,t} = exp(log π_θ(x_{t+1}|x_t) − log π_old(x_{t+1}|x_t))
    ℓ_{i,t} = −w_i · min(ρ·A_{i,t}, clip(ρ, 1−ε, 1+ε)·A_{i,t}) + β·KL_{i,t}

w_i is OP-GRPO's detached sequence-level importance weight (1 for fresh samples); A_{i,t} = A_i for
GRPO or the Stepwise gain advantage. The KL to the reference (adapter disabled) on the step means:

    exact:      KL = mean_D |μ_θ − μ_ref|² / (2 s²)          (s = the step's std)
    flow_grpo:  KL = mean_D |μ_θ − μ_ref|² / (2 s²/|dt|)     (Flow-GRPO's code: s_t without √|dt|)

The loss is a *sum* over the transitions given, divided by `normalizer` (the number of trained
transitions in the whole minibatch), so that accumulating over chunks and steps gives the mean.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from flowpo.stats import scalar


class LossStats(NamedTuple):
    """Detached 0-dim sums over the transitions given (flowpo.stats: means over `count`)."""

    count: torch.Tensor            # transitions
    ratio_sum: torch.Tensor        # Σ ρ
    ratio_max: torch.Tensor        # max ρ
    clipped: torch.Tensor          # transitions with |ρ − 1| > ε
    approx_kl_sum: torch.Tensor    # Σ ((ρ−1) − log ρ)   (Schulman's k3 estimator of KL(old‖θ))
    policy_loss_sum: torch.Tensor  # Σ −w·min(...)
    kl_sum: torch.Tensor           # Σ KL

    METRICS = {"ratio_sum": ("stats/ratio_mean", "sum"), "ratio_max": ("stats/ratio_max", "max"),
               "clipped": ("stats/clipfrac", "sum"), "approx_kl_sum": ("stats/approx_kl", "sum"),
               "policy_loss_sum": ("loss/policy", "sum"), "kl_sum": ("loss/kl", "sum")}


def ppo_clip(ratio: torch.Tensor, advantages: torch.Tensor, clip_range: float) -> torch.Tensor:
    """PPO's clipped surrogate per element, as a loss: −min(ρ·A, clip(ρ, 1−ε, 1+ε)·A)."""
    return -torch.minimum(ratio * advantages, torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range) * advantages)


def clipped_surrogate(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                      clip_range: float, *, weights: torch.Tensor | None = None,
                      kl: torch.Tensor | None = None, kl_beta: float = 0.0,
                      normalizer: float = 1.0) -> tuple[torch.Tensor, LossStats]:
    """log_prob, old_log_prob, advantages, weights, kl: [M] over M trained transitions → (loss, stats)."""
    log_ratio = log_prob - old_log_prob          # [M]
    ratio = torch.exp(log_ratio)
    per = ppo_clip(ratio, advantages, clip_range)  # [M]
    if weights is not None:
        per = per * weights.detach()
    total = per.sum()
    kl_total = per.new_zeros(())
    if kl is not None and kl_beta > 0:
        kl_total = kl.sum()
        total = total + kl_beta * kl_total
    with torch.no_grad():
        lr = log_ratio.detach()
        r = ratio.detach()
        stats = LossStats(
            count=scalar(r.numel(), r), ratio_sum=scalar(r.sum(), r),
            ratio_max=scalar(r.max() if r.numel() else 1.0, r),
            clipped=scalar(((r - 1.0).abs() > clip_range).sum(), r),
            approx_kl_sum=scalar(((lr.exp() - 1) - lr).sum(), r), policy_loss_sum=scalar(per.detach().sum(), r),
            kl_sum=scalar(kl_total.detach(), r))
    return total / normalizer, stats


def mean_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor, dt: float,
            form: str = "exact") -> torch.Tensor:
    """KL between the step Gaussians of the policy and the reference, averaged over latent dims.

    mean, ref_mean [M, *D]; std [M] → [M]. See the module docstring for the two forms.
    """
    var = std.float() ** 2
    if form == "flow_grpo":
        var = var / max(abs(dt), 1e-12)
    elif form != "exact":
        raise ValueError(f"kl form {form!r}; allowed: 'exact', 'flow_grpo'")
    sq = ((mean.float() - ref_mean.float()) ** 2).flatten(1).mean(1)
    return sq / (2 * var.clamp_min(1e-20))
