"""What GRPO-Guard and Flow-DPPO add to the clipped surrogate's data: π_old's step means.

Both compare the current step Gaussian N(μ_θ(x_t), s²I) with π_old's N(μ_old(x_t), s²I) at every
trained transition (the same s: the kernels' std does not depend on the weights). μ_old is the mean
at the iteration's starting weights θ, the π_old of `clipped.py` (for fresh rows the rollout's own
mean, bit for bit: the same chunk of rows, the same weights). Like AWM's ℓ_old it costs no extra
model call on the update's first minibatch, whose first forward runs at exactly those weights; the
chunks of later minibatches get a no-grad pass in `begin` (UniRL's Flow-DPPO replays every step
once before the update; flow_grpo's GRPO-Guard keeps the rollout's means).

    mean_gap(μ_θ, μ_old, s) = mean_D (μ_θ − μ_old)² / (2 s²)      (= KL(π_old ‖ π_θ) / D, exact)
"""
from __future__ import annotations

import torch

from flowpo.objectives.clipped import ClippedSurrogate
from flowpo.policy.base import select_cond
from flowpo.trajectory import trained_steps


def mean_gap(mean: torch.Tensor, old_mean: torch.Tensor, std: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """reduce_D (μ_θ − μ_old)² / (2 s²): the exact KL between N(μ_old, s²I) and N(μ_θ, s²I), per
    latent dim (mean) or whole (sum). mean, old_mean [m, *D]; std [m] → [m]."""
    sq = ((mean - old_mean) ** 2).flatten(1)
    sq = sq.mean(1) if reduction == "mean" else sq.sum(1)
    return sq / (2 * std ** 2).clamp_min(1e-20)


class StepMeansSurrogate(ClippedSurrogate):
    """A ClippedSurrogate that also knows μ_old of every trained pair (`old_mean`). Subclasses
    override `_surrogate(b, st, ids, t, rows, kl, count)` and read `self.old_mean(st, ids, t, rows)`."""

    def __init__(self, ctx, cfg):
        super().__init__(ctx, cfg)
        self.o = cfg.objective
        self.mu_old = None     # [M, T, *D] π_old's step means of the trained pairs
        self._fresh = set()    # ids of the chunks whose first forward (at θ) is still to come
        self._taking = False   # this chunk's forward gives μ_old

    def begin(self, b, iteration: int, first=()) -> None:
        super().begin(b, iteration, first)
        self.mu_old = torch.zeros(b.train.shape + b.states.shape[2:], device=b.states.device)
        first = set(first)
        self._fresh = {id(b.chunks.rows[j]) for j in first}
        with torch.no_grad():  # every rank runs the same chunks and (agreed) steps under lock-step
            for j, idx in enumerate(b.chunks.rows):
                if j in first:
                    continue
                cond = select_cond(b.cond, idx)
                for t in trained_steps(b, idx, self.ctx.policy):
                    self.mu_old[idx, t] = self.rescore(b.states, idx, t, cond).mean

    def chunk_loss(self, b, idx: torch.Tensor, count: float) -> list:
        self._taking = id(idx) in self._fresh
        self._fresh.discard(id(idx))
        return super().chunk_loss(b, idx, count)

    def weighted_total(self, b, per: torch.Tensor, ids: torch.Tensor, t: int, rows: torch.Tensor, kl):
        """(per-row losses × the rows' importance weights, their sum + β·Σ KL, Σ KL) at step t."""
        per = per * b.weights[ids, t][rows].detach()
        if kl is None or self.loss.kl_beta <= 0:
            return per, per.sum(), per.new_zeros(())
        kl_total = kl.sum()
        return per, per.sum() + self.loss.kl_beta * kl_total, kl_total

    def old_mean(self, st, ids: torch.Tensor, t: int, rows: torch.Tensor) -> torch.Tensor:
        """μ_old [m, *D] of rows ids[rows] at step t; from this forward (`st`) on the first minibatch."""
        sel = ids[rows.cpu()]
        if self._taking:
            self.mu_old[sel, t] = st.mean[rows].detach()
        return self.mu_old[sel, t]

    def end(self, iteration: int) -> dict:
        self.mu_old, self._fresh, self._taking = None, set(), False
        return super().end(iteration)
