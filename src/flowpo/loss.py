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


class LossStats(NamedTuple):
    """Detached sums over the transitions given (divide by `count` for means)."""

    count: int              # transitions
    ratio_sum: float        # Σ ρ
    ratio_max: float        # max ρ
    clipped: int            # transitions with |ρ − 1| > ε
    approx_kl_sum: float    # Σ ((ρ−1) − log ρ)   (Schulman's k3 estimator of KL(old‖θ))
    policy_loss_sum: float  # Σ −w·min(...)
    kl_sum: float           # Σ KL


def clipped_surrogate(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                      clip_range: float, *, weights: torch.Tensor | None = None,
                      kl: torch.Tensor | None = None, kl_beta: float = 0.0,
                      normalizer: float = 1.0) -> tuple[torch.Tensor, LossStats]:
    """log_prob, old_log_prob, advantages, weights, kl: [M] over M trained transitions → (loss, stats)."""
    log_ratio = log_prob - old_log_prob          # [M]
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range) * advantages
    per = -torch.minimum(unclipped, clipped)     # [M]
    if weights is not None:
        per = per * weights.detach()
    total = per.sum()
    kl_total = torch.zeros(())
    if kl is not None and kl_beta > 0:
        kl_total = kl.sum()
        total = total + kl_beta * kl_total
    with torch.no_grad():
        lr = log_ratio.detach()
        stats = LossStats(
            count=int(ratio.numel()),
            ratio_sum=float(ratio.detach().sum()),
            ratio_max=float(ratio.detach().max()) if ratio.numel() else 1.0,
            clipped=int(((ratio.detach() - 1.0).abs() > clip_range).sum()),
            approx_kl_sum=float(((lr.exp() - 1) - lr).sum()),
            policy_loss_sum=float(per.detach().sum()),
            kl_sum=float(kl_total.detach()),
        )
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


def merge_stats(stats: list[LossStats]) -> dict[str, float]:
    """Means over all transitions of a list of chunk stats → namespaced metrics."""
    n = sum(s.count for s in stats)
    if n == 0:
        return {}
    return {
        "stats/ratio_mean": sum(s.ratio_sum for s in stats) / n,
        "stats/ratio_max": max(s.ratio_max for s in stats),
        "stats/clipfrac": sum(s.clipped for s in stats) / n,
        "stats/approx_kl": sum(s.approx_kl_sum for s in stats) / n,
        "loss/policy": sum(s.policy_loss_sum for s in stats) / n,
        "loss/kl": sum(s.kl_sum for s in stats) / n,
        "stats/transitions": float(n),
    }
