"""`diffusion_nft`: DiffusionNFT, Online Diffusion Reinforcement with Forward Process
(Zheng et al. 2025, arXiv 2509.16117).

Flow matching on the forward process of the final samples, contrasting two implicit policies
built from the old (sampling) policy v_old and the trained one v_θ, with β = `objective.nft_beta`:

    v⁺ = (1 − β)·v_old + β·v_θ            (implicit positive policy)
    v⁻ = (1 + β)·v_old − β·v_θ            (implicit negative policy)

The advantage A of a sample (the advantage part's group z-score, or a stepwise gain at the trained
step) becomes an optimality probability, A_max = `objective.adv_max`:

    r = ½ + ½·clip(A / A_max, −1, 1)  ∈ [0, 1]

and at every trained (sample, σ) with x_σ = (1−σ)x0 + σε and u = ε − x0 (flow_matching.py):

    L = (A_max / β)·[ r·‖x̂0⁺ − x0‖²/w⁺ + (1 − r)·‖x̂0⁻ − x0‖²/w⁻ ] + β_ref·‖v_θ − v_ref‖²
    x̂0± = x_σ − σ·v±,   w± = sg(mean_D |x̂0± − x0|) ∨ 1e-5      (adaptive weighting, float64)

‖·‖² is the mean over latent dims; β_ref = `objective.ref_beta` weighs a velocity-space KL to the
reference (adapter disabled). The optimum moves v toward v_old + (2/β)·Δ where Δ points from the
negative to the positive data: no likelihood, no SDE, any solver (an ODE rollout by default).
The sampling policy is θ_old, a soft copy updated after each iteration (`objective.old_ramp`,
`objective.old_max`; the paper's η_i = min(0.001·i, 0.5) per optimizer step, scaled in the preset
to the embedded task's iteration budget, docs/methods.md). Guidance: CFG-free (sample.guidance=1).
v_old is predicted once per iteration before the first optimizer step, at the same x_σ.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from flowpo.objectives.flow_matching import FinalSampleObjective
from flowpo.sde import predict_x0
from flowpo.stats import scalar


class NFTStats(NamedTuple):
    """Detached 0-dim sums over one (chunk, step)'s trained rows (flowpo.stats)."""

    count: torch.Tensor
    policy: torch.Tensor        # Σ L (the NFT term)
    positive: torch.Tensor      # Σ L⁺
    negative: torch.Tensor      # Σ L⁻
    kl: torch.Tensor            # Σ β_ref·‖v_θ − v_ref‖²
    optimality: torch.Tensor    # Σ r

    METRICS = {"policy": ("loss/policy", "sum"), "positive": ("loss/nft_positive", "sum"),
               "negative": ("loss/nft_negative", "sum"), "kl": ("loss/kl", "sum"),
               "optimality": ("stats/optimality", "sum")}


def nft_loss(v: torch.Tensor, v_old: torch.Tensor, x: torch.Tensor, x0: torch.Tensor, sigma: float,
             r: torch.Tensor, beta: float, adv_max: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample DiffusionNFT loss (without the reference term) → (loss [n], L⁺ [n], L⁻ [n]).

    v, v_old, x (= x_σ), x0: [n, *D]; r: [n] optimality probabilities in [0, 1]."""
    v_pos = (1.0 - beta) * v_old + beta * v
    v_neg = (1.0 + beta) * v_old - beta * v
    x0 = x0.double()

    def weighted(vv: torch.Tensor) -> torch.Tensor:
        x0_hat = predict_x0(x.double(), vv.double(), sigma)
        err = (x0_hat - x0).flatten(1)
        w = err.abs().mean(1).detach().clamp_min(1e-5)
        return (err ** 2).mean(1) / w

    l_pos, l_neg = weighted(v_pos), weighted(v_neg)
    r = r.double()
    return ((adv_max / beta) * (r * l_pos + (1.0 - r) * l_neg)).float(), l_pos.float(), l_neg.float()


def optimality(adv: torch.Tensor, adv_max: float) -> torch.Tensor:
    """r = ½ + ½·clip(A / A_max, −1, 1)."""
    return 0.5 + 0.5 * (adv / adv_max).clamp(-1.0, 1.0)


class DiffusionNFT(FinalSampleObjective):
    """objective.kind=diffusion_nft; options objective.nft_beta, adv_max, ref_beta, old_ramp, old_max."""

    Stats = NFTStats

    def _prepare(self, b, first) -> None:
        # v_old at every trained (row, σ): under θ_old (the sampling policy), before any update. With
        # old_ramp > 0 (the preset) θ_old is other weights than the update's from iteration 2 on; at
        # old_ramp = 0 it is θ and this pass repeats the update's first forward (not taken from it yet)
        with self.sampling():
            self._store(b, "v_old", lambda idx, t, rows, sig, x, u, cond: self._velocity(x, sig, cond))

    def _term(self, b, idx, t, rows, sig, x, u, v, cond):
        o = self.o
        r = optimality(b.adv[idx, t][rows], o.adv_max)
        x0 = b.final[idx][rows].float()
        loss, l_pos, l_neg = nft_loss(v[rows], self.v_old[idx, t][rows], x[rows], x0, sig, r, o.nft_beta, o.adv_max)
        ref = self._ref_term(v, x, sig, cond, rows, idx, t)
        per = loss + ref
        stat = NFTStats(scalar(rows.sum(), v), scalar(loss.sum(), v), scalar(l_pos.sum(), v),
                        scalar(l_neg.sum(), v), scalar(ref.sum(), v), scalar(r.sum(), v))
        return per, stat
