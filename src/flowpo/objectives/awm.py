"""`awm`: Advantage Weighted Matching (Xue et al. 2025, arXiv 2509.25050).

The pretraining flow-matching loss, weighted by the advantage, as a policy-gradient surrogate:
with x_σ = (1−σ)x0 + σε, u = ε − x0 (flow_matching.py) and the per-sample matching error

    m_θ = mean_D (v_θ(x_σ) − u)²                                   (float64)

a log-likelihood surrogate ℓ_θ = −φ(m_θ, σ) (`objective.awm_weighting`):

    uniform: φ = m          t: φ = σ·m          ghuber: φ = σ·((m + 1e-10)^p − 1e-10^p)/p,  p = awm_p

and a PPO-style ratio against the pre-update weights (ℓ_old is ℓ at the iteration's starting weights,
at the same x_σ: the update's own forward gives it on the first minibatch, a pass before the first
optimizer step on the others; on the first minibatch ρ = 1 exactly and the gradient is the paper's
−A·∇ℓ_θ):

    ρ = exp(ℓ_θ − ℓ_old),    L = max(−A'·ρ, −A'·clip(ρ, 1 − ε_c, 1 + ε_c))
        + β_ref·‖v_θ − v_ref‖² + β_anchor·‖v_θ − v_anchor‖²

A' = clip(A, ±A_max)/A_max ∈ [−1, 1] (`objective.adv_max`; the paper's advantage_max = 1 after a
clip at 5), ε_c = `objective.awm_clip` (the paper's configs: 1), v_ref the reference (adapter
disabled, `objective.ref_beta`), v_anchor the soft copy θ_old (`objective.anchor_beta`, updated as
in flow_matching.py; the paper's EMA anchor with decay min(0.001·step, 0.3)). The rollout uses the
current weights (the paper's default, off-policy sampling off).
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch

from flowpo.loss import ppo_clip
from flowpo.objectives.flow_matching import FinalSampleObjective
from flowpo.stats import scalar


class AWMStats(NamedTuple):
    """Detached 0-dim sums over one (chunk, step)'s trained rows (flowpo.stats)."""

    count: torch.Tensor
    policy: torch.Tensor        # Σ clipped advantage-weighted term
    kl: torch.Tensor            # Σ β_ref·‖v_θ − v_ref‖²
    anchor: torch.Tensor        # Σ β_anchor·‖v_θ − v_anchor‖²
    ratio_sum: torch.Tensor     # Σ ρ
    ratio_max: torch.Tensor     # max ρ
    clipped: torch.Tensor       # rows with |ρ − 1| > ε_c
    nll: torch.Tensor           # Σ −ℓ_θ

    METRICS = {"policy": ("loss/policy", "sum"), "kl": ("loss/kl", "sum"), "anchor": ("loss/anchor", "sum"),
               "ratio_sum": ("stats/ratio_mean", "sum"), "ratio_max": ("stats/ratio_max", "max"),
               "clipped": ("stats/clipfrac", "sum"), "nll": ("stats/neg_log_likelihood", "sum")}


def awm_log_likelihood(v: torch.Tensor, u: torch.Tensor, sigma: float, weighting: str, p: float) -> torch.Tensor:
    """ℓ = −φ(mean_D (v − u)², σ) per sample, float64 → [n]."""
    m = ((v.double() - u.double()) ** 2).flatten(1).mean(1)
    if weighting == "uniform":
        return -m
    if weighting == "t":
        return -m * sigma
    if weighting == "ghuber":
        return -((m + 1e-10) ** p - 1e-10 ** p) * sigma / p
    raise ValueError(f"objective.awm_weighting={weighting!r}; allowed: uniform, t, ghuber")


class AWM(FinalSampleObjective):
    """objective.kind=awm; options objective.awm_weighting, awm_p, awm_clip, adv_max, ref_beta,
    anchor_beta, old_ramp, old_max."""

    Stats = AWMStats

    def sampling(self, iteration: int = 0):
        return contextlib.nullcontext()  # on-policy sampling; θ_old is only the anchor

    def _ll(self, v, u, sig):
        return awm_log_likelihood(v, u, sig, self.o.awm_weighting, self.o.awm_p)

    def _prepare(self, b, first) -> None:
        # ℓ_old is at the current weights: the chunks of the first minibatch take it from the
        # update's own forward (_first_forward), the others need a pass of their own now
        self._store(b, "ll_old", lambda idx, t, rows, sig, x, u, cond: self._ll(self._velocity(x, sig, cond), u, sig),
                    skip=first)
        if self.o.anchor_beta > 0:
            with self.old.swapped():
                self._store(b, "v_anchor", lambda idx, t, rows, sig, x, u, cond: self._velocity(x, sig, cond))

    def _first_forward(self, b, idx, t, sig, x, u, v, cond) -> None:
        self._put(b, "ll_old", idx, t, self._ll(v, u, sig))  # the same numbers as a separate pass

    def _term(self, b, idx, t, rows, sig, x, u, v, cond):
        o = self.o
        a = b.adv[idx, t][rows].double().clamp(-o.adv_max, o.adv_max) / o.adv_max
        ll = self._ll(v[rows], u[rows], sig)
        # (no table yet: every chunk takes ℓ_old from its first forward and no row of this rank has
        # trained so far, so `rows` is empty: a lock-stepped rank's empty part of a chunk)
        ll_old = self.ll_old[idx, t][rows] if self.ll_old is not None else ll.detach()
        ratio = torch.exp(ll - ll_old)
        pg = ppo_clip(ratio, a, o.awm_clip).float()
        ref = self._ref_term(v, x, sig, cond, rows, idx, t)
        anchor = torch.zeros_like(ref)
        if o.anchor_beta > 0:
            anchor = o.anchor_beta * ((v - self.v_anchor[idx, t]) ** 2).flatten(1).mean(1)[rows]
        per = pg + ref + anchor
        r = ratio.detach()
        stat = AWMStats(scalar(rows.sum(), v), scalar(pg.sum(), v), scalar(ref.sum(), v), scalar(anchor.sum(), v),
                        scalar(r.sum(), v), scalar(r.max() if r.numel() else 1.0, v),
                        scalar(((r - 1).abs() > o.awm_clip).sum(), v), scalar((-ll).sum(), v))
        return per, stat

