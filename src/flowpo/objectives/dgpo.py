"""`dgpo`: DGPO, Reinforcing Diffusion Models by Direct Group Preference Optimization
(Luo, Hu, Tang, ICLR 2026, arXiv 2510.08425; the authors' code: Luo-Yihong/DGPO,
`scripts/train_sd3_dgpo.py`, `config/dgpo.py`).

DPO over groups instead of pairs. A group's samples are split by their advantage into a positive set
G⁺ (A > 0) and a negative set G⁻ (A < 0), and the policy maximises the likelihood of the group-level
preference (the paper's group objective as the authors' README states it; the arXiv text, and so its
equation numbers, was not available to us):

    max_θ  log σ(R_θ(G⁺|c) − R_θ(G⁻|c)),      R_θ(G|c) = Σ_{x∈G} |A_x|·r_θ(x|c)

with Diffusion-DPO's implicit reward r_θ(x) = −β·[m_θ(x) − m_ref(x)], estimated at a noised final
sample x_σ = (1 − σ)·x0 + σ·ε, u = ε − x0 (flow_matching.py; the plan's steps give σ):

    m_θ = mean_D (v_θ(x_σ) − u)²,      m_ref = mean_D (v_ref(x_σ) − u)².

Because A > 0 on G⁺ and A < 0 on G⁻, R(G⁺) − R(G⁻) = −β·Σ_{x∈g} A_x·(m_θ − m_ref). With the group sum

    s_{g,σ} = (β/G)·Σ_{x∈g} A_x·(m_θ,x − m_ref,x)          (β = objective.dgpo_beta; g's rows at this σ)

the loss of group g is −log σ(−s), whose gradient is σ(s)·(β/G)·Σ_x A_x·∇m_θ,x. The authors' code
minimises the gradient-equivalent surrogate (its gradient is that one divided by β), which this
objective reproduces:

    L = mean over trained (row, σ) of   sg(σ(s_{g,σ}))·A·m̃_θ   +   β_KL·mean_D (v_θ − v_ref)²

- s uses m_θ at the iteration's starting weights: a no-grad pass in `begin` over every trained pair,
  all ranks' rows of a group summed (`Context.reduce_sum`). The preset takes one optimizer step per
  iteration (as the authors' configs: one step per epoch), so this is exactly the code's value; with
  more minibatches or passes the weight stays the iteration's first.
- m̃ is PPO-style clipped (added in the authors' code at a reviewer's request): with the ratio
  ρ = exp(m_old − m_θ) against the soft copy θ_old (their EMA "ema_ref", decay min(0.001·step, 0.3);
  `objective.old_ramp`, `old_max`, flow_matching.py), m̃ = sg(m_θ) where A > 0 and ρ > 1 + ε, or A < 0
  and ρ < 1 − ε (ε = `objective.dgpo_clip`); otherwise m̃ = m_θ. With θ_old = θ the first ratio is 1.
- v_ref is the frozen reference (adapter disabled). `objective.dgpo_reference=old` measures the
  preference against θ_old instead (their use_ema_ref, TDM-R1's dynamic reference); the KL term
  always uses the frozen reference (β_KL = `objective.ref_beta`).
- Members of a group share ε at each trained σ (`objective.dgpo_group_noise`, their use_shared_noise).
- From iteration `objective.old_sampling_from` on, the rollout samples with θ_old (their
  switch_ema_ref; null: never).
The rollout is the deterministic ODE (their noise_level 0), and the plan (`random_steps`) trains k
random steps of the first part of the grid, shared by the batch (their num_train_timesteps = 4 of
trunc_steps + 1 = 5). Replayed rows (OP-GRPO) join their group's sum like fresh ones.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch

from flowpo.objectives.flow_matching import FinalSampleObjective
from flowpo.stats import scalar


class DGPOStats(NamedTuple):
    """Detached 0-dim sums over one (chunk, step)'s trained rows (flowpo.stats)."""

    count: torch.Tensor
    policy: torch.Tensor        # Σ σ(s)·A·m_θ
    kl: torch.Tensor            # Σ β_KL·‖v_θ − v_ref‖²
    weight: torch.Tensor        # Σ σ(s), the group preference weight
    matching: torch.Tensor      # Σ m_θ
    clipped: torch.Tensor       # rows whose m_θ gradient the clip dropped
    ratio_sum: torch.Tensor     # Σ exp(m_old − m_θ)

    METRICS = {"policy": ("loss/policy", "sum"), "kl": ("loss/kl", "sum"), "weight": ("stats/dgpo_weight", "sum"),
               "matching": ("stats/matching_loss", "sum"), "clipped": ("stats/clipfrac", "sum"),
               "ratio_sum": ("stats/ratio_mean", "sum")}


def matching_loss(v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """m = mean_D (v − u)² per row, float64 → [n]."""
    return ((v.double() - u.double()) ** 2).flatten(1).mean(1)


def group_weights(adv: torch.Tensor, m: torch.Tensor, m_ref: torch.Tensor, train: torch.Tensor,
                  group_ids: torch.Tensor, groups: int, beta: float, reduce_sum=lambda t: t) -> torch.Tensor:
    """σ(s_{g,t}) with s_{g,t} = (β/G_{g,t})·Σ_{x∈g} A_{x,t}·(m_{x,t} − m_ref_{x,t}) over the rows that
    train t (G_{g,t} of them, all ranks' through `reduce_sum`). adv, m, m_ref [M, T]; train [M, T] bool;
    group_ids [M] in [0, groups) → [groups, T] float64."""
    on = train.to(torch.float64)
    term = adv.double() * (m.double() - m_ref.double()) * on                            # [M, T]
    gid = group_ids.to(term.device)
    sums = torch.zeros((groups, term.shape[1]), dtype=torch.float64, device=term.device).index_add_(0, gid, term)
    count = torch.zeros_like(sums).index_add_(0, gid, on)
    both = reduce_sum(torch.stack([sums, count]))
    return torch.sigmoid(beta * both[0] / both[1].clamp_min(1))


class DGPO(FinalSampleObjective):
    """objective.kind=dgpo; options objective.dgpo_beta, dgpo_clip, dgpo_reference, dgpo_group_noise,
    old_sampling_from, ref_beta, old_ramp, old_max."""

    Stats = DGPOStats

    def __init__(self, ctx, cfg):
        super().__init__(ctx, cfg)
        self.groups = cfg.sample.prompts_per_iteration
        self.weight = self.m_cur = self.m_ref = self.m_old = self.v_ref = None

    def sampling(self, iteration: int = 0):
        """The current weights, or θ_old from iteration objective.old_sampling_from on."""
        start = self.o.old_sampling_from
        return self.old.swapped() if start is not None and start <= iteration else contextlib.nullcontext()

    def _noise_seeds(self, b, iteration: int, stream_seed) -> list[int]:
        if not self.o.dgpo_group_noise:
            return super()._noise_seeds(b, iteration, stream_seed)
        return [stream_seed(self.ctx.seed, iteration, 7, g) for g in b.group_ids.tolist()]  # one ε per group

    def _prepare(self, b, first) -> None:
        # no grad, before any optimizer step: m_θ (the group weights need every member's), m_ref and
        # v_ref (the KL term), m_old under θ_old (the clip; = m_θ when θ_old is θ, old_ramp = 0)
        o = self.o
        old_ref = o.dgpo_reference == "old"
        keep_old = o.old_ramp > 0
        self.m_cur = self.m_ref = self.m_old = self.v_ref = None
        for idx, t, rows, sig, x, u, cond in self._each_trained(b):
            self._put(b, "m_cur", idx, t, matching_loss(self._velocity(x, sig, cond), u))
            if o.ref_beta > 0 or not old_ref:
                v_ref = self._ref_velocity(x, sig, cond)
                if not old_ref:
                    self._put(b, "m_ref", idx, t, matching_loss(v_ref, u))
                if o.ref_beta > 0:
                    self._put(b, "v_ref", idx, t, v_ref)
            if keep_old:
                with self.old.swapped():
                    self._put(b, "m_old", idx, t, matching_loss(self._velocity(x, sig, cond), u))
        if self.m_cur is None:  # no trained pair on this rank: still join the group sums
            M, T = b.train.shape
            self.m_cur = torch.zeros((M, T), dtype=torch.float64, device=b.train.device)
        if not keep_old:
            self.m_old = self.m_cur
        if old_ref:
            self.m_ref = self.m_old
        if self.m_ref is None:
            self.m_ref = self.m_cur
        self.weight = group_weights(b.adv, self.m_cur, self.m_ref, b.train, b.group_ids, self.groups, o.dgpo_beta,
                                    self.ctx.reduce_sum)

    def _term(self, b, idx, t, rows, sig, x, u, v, cond):
        o = self.o
        a = b.adv[idx, t][rows].double()
        m = matching_loss(v[rows], u[rows])
        ratio = torch.exp(self.m_old[idx, t][rows] - m.detach())
        clip = torch.where(a > 0, ratio > 1 + o.dgpo_clip, ratio < 1 - o.dgpo_clip)
        m_c = torch.where(clip, m.detach(), m)
        w = self.weight[b.group_ids[idx].to(v.device)[rows], t]
        pg = (w * a * m_c).float()
        kl = torch.zeros_like(pg)
        if o.ref_beta > 0:
            kl = o.ref_beta * ((v - self.v_ref[idx, t]) ** 2).flatten(1).mean(1)[rows]
        stat = DGPOStats(scalar(rows.sum(), v), scalar(pg.sum(), v), scalar(kl.sum(), v), scalar(w.sum(), v),
                         scalar(m.detach().sum(), v), scalar(clip.sum(), v), scalar(ratio.sum(), v))
        return pg + kl, stat

    def end(self, iteration: int) -> dict:
        self.weight = self.m_cur = self.m_ref = self.m_old = self.v_ref = None
        return super().end(iteration)
