"""Advantages: GRPO group z-scores, multi-reward aggregation, and Stepwise-Flow-GRPO gains.

Shapes: N samples, G per group, T steps, K rewards.
"""
from __future__ import annotations

from typing import Literal

import torch

from flowpo.groups import group_stats


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *,
                     std: Literal["global", "group"] = "global", eps: float = 1e-4,
                     clip: float = 5.0) -> torch.Tensor:
    """GRPO advantages (Flow-GRPO, arXiv 2505.05470, Eq. 4):

        A_i = clip((r_i − mean_{g(i)}(r)) / (σ + eps), −clip, clip)

    with σ the std of all N rewards ("global", Flow-GRPO's default) or of the group ("group").
    rewards [N], group_ids [N] (equal ids = same prompt) → [N] fp32.
    """
    if std not in ("global", "group"):
        raise ValueError(f"std={std!r}; allowed: 'global', 'group'")
    r = rewards.to(torch.float64)
    mean, gstd = group_stats(r, group_ids)
    denom = r.std(unbiased=False) if std == "global" else gstd
    adv = (r - mean) / (denom + eps)
    return adv.clamp(-clip, clip).to(torch.float32)


def aggregate_advantages(raw: torch.Tensor, weights: torch.Tensor, group_ids: torch.Tensor, *,
                         aggregation: Literal["sum_then_normalize", "normalize_then_sum"],
                         std: Literal["global", "group"] = "global", eps: float = 1e-4,
                         clip: float = 5.0) -> torch.Tensor:
    """Multi-reward advantages from raw rewards [N, K] and weights [K] → [N].

    sum_then_normalize (Flow-GRPO):  A = z(Σ_k w_k r_k)
    normalize_then_sum (MixGRPO, arXiv 2507.21802 "advantage aggregation"):  A = Σ_k w_k z(r_k)
    where z is `group_advantages` (its clip applies to the final sum).
    """
    return _aggregate(raw, weights, aggregation, clip,
                      lambda r, c: group_advantages(r, group_ids, std=std, eps=eps, clip=c))


def _aggregate(values: torch.Tensor, weights: torch.Tensor, aggregation: str, clip: float, z) -> torch.Tensor:
    """The two multi-reward aggregations over the last dim K of `values` ([..., K]), for a
    normaliser z(values [...], clip) → advantages:

        sum_then_normalize:  z(Σ_k w_k v_k)                  (Flow-GRPO)
        normalize_then_sum:  clip(Σ_k w_k z(v_k))            (MixGRPO's advantage aggregation)
    """
    if aggregation == "sum_then_normalize":
        return z(values @ weights, clip)
    if aggregation == "normalize_then_sum":
        zs = torch.stack([z(values[..., k], float("inf")) for k in range(values.shape[-1])], dim=-1)
        return (zs @ weights).clamp(-clip, clip)
    raise ValueError(f"aggregation={aggregation!r}; allowed: 'sum_then_normalize', 'normalize_then_sum'")


def stepwise_advantages(step_rewards: torch.Tensor, group_ids: torch.Tensor, *,
                        normalize: Literal["joint", "per_step"] = "joint", eps: float = 1e-4,
                        clip: float = 5.0, valid: torch.Tensor | None = None,
                        std: Literal["group", "global"] = "group") -> torch.Tensor:
    """Stepwise-Flow-GRPO gain advantages (arXiv 2603.28718).

    step_rewards [N, T+1]: r_t = R(x̂0(x_t)) before each step t and, last, the reward after step T−1.
    Gain of transition t (x_t → x_{t+1}):  g_t = r_{t+1} − r_t            # [N, T]
    (Σ_t g_t = r_T − r_0 telescopes.) Then
      joint:    Ã_{i,t} = (g_{i,t} − mean_{group, all t} g) / (std_{group, all t} g + eps)
      per_step: Ã_{i,t} = (g_{i,t} − mean_{group} g_{·,t}) / (std_{group} g_{·,t} + eps)
    clipped to ±clip. `valid` [N, T] (optional) restricts the statistics to the steps that have an
    estimate (for example only a MixGRPO window); invalid entries get advantage 0.

    std='global' keeps the group mean but divides by the std of all valid gains of the batch (of
    step t, with per_step) — Flow-GRPO's global std carried over to gains: a group whose samples all
    score alike (a saturated reward) then gets small advantages instead of unit-scale noise.
    """
    if step_rewards.dim() != 2:
        raise ValueError(f"step_rewards must be [N, T+1], got shape {tuple(step_rewards.shape)}")
    g = (step_rewards[:, 1:] - step_rewards[:, :-1]).to(torch.float64)  # [N, T]
    if valid is None:
        valid = torch.ones_like(g, dtype=torch.bool)
    if std not in ("group", "global"):
        raise ValueError(f"std={std!r}; allowed: 'group', 'global'")
    if normalize == "joint":
        out = _masked_group_z(g, valid, group_ids, eps, std)
    elif normalize == "per_step":
        out = torch.zeros_like(g)
        for t in range(g.shape[1]):
            out[:, t] = _masked_group_z(g[:, t:t + 1], valid[:, t:t + 1], group_ids, eps, std)[:, 0]
    else:
        raise ValueError(f"normalize={normalize!r}; allowed: 'joint', 'per_step'")
    return out.clamp(-clip, clip).to(torch.float32)


def aggregate_stepwise_advantages(step_rewards: torch.Tensor, weights: torch.Tensor, group_ids: torch.Tensor, *,
                                  aggregation: Literal["sum_then_normalize", "normalize_then_sum"],
                                  normalize: Literal["joint", "per_step"] = "joint", eps: float = 1e-4,
                                  clip: float = 5.0, valid: torch.Tensor | None = None,
                                  std: Literal["group", "global"] = "group") -> torch.Tensor:
    """Stepwise gain advantages from K rewards: step_rewards [N, T+1, K], weights [K] → [N, T].

    sum_then_normalize:  Ã = z(gains of Σ_k w_k r_k)            (`stepwise_advantages` on the sum)
    normalize_then_sum:  Ã = Σ_k w_k z(gains of r_k)            (MixGRPO's aggregation, per step)
    where z is the joint or per-step group z-score of `stepwise_advantages`; the clip applies to
    the final value. With one reward both give the same result.
    """
    if step_rewards.dim() != 3 or step_rewards.shape[2] != weights.numel():
        raise ValueError(f"step_rewards must be [N, T+1, K={weights.numel()}], got {tuple(step_rewards.shape)}")
    return _aggregate(step_rewards, weights.to(step_rewards), aggregation, clip,
                      lambda r, c: stepwise_advantages(r, group_ids, normalize=normalize, eps=eps, clip=c,
                                                       valid=valid, std=std))


def _masked_group_z(g: torch.Tensor, valid: torch.Tensor, group_ids: torch.Tensor, eps: float,
                    std: str = "group") -> torch.Tensor:
    """(g − group mean) / (std + eps) over the valid entries of g [N, M]; 0 where invalid. std:
    'group' = each group's std over all valid entries of its rows, 'global' = the std of all valid
    entries of g."""
    v = valid.to(g.dtype)
    mean, group_std = group_stats(g, group_ids, valid)                    # [N], [N]
    if std == "global":  # over all valid entries of the batch
        n_all = v.sum().clamp_min(1)
        mu = (g * v).sum() / n_all
        scale = ((((g - mu) ** 2) * v).sum() / n_all).sqrt()
    else:
        scale = group_std[:, None]
    z = (g - mean[:, None]) / (scale + eps)
    return z * v


# ----------------------------------------------------------------------------- the advantage part
# An estimator: intermediate(policy, traj, sigmas) → (step rewards [n, T+1, K] or None, nfe, stats)
# on this rank's rows after the final rewards; estimate(rows) → (advantages [N, T], stats) on the
# global rows (fresh, then replayed), a plain function of them.
class GroupEstimator:
    """advantage.kind=group: one GRPO z-score per sample (`aggregate_advantages`), the same at every step."""

    def __init__(self, cfg, rewards):
        self.cfg, self.rewards = cfg, rewards

    def intermediate(self, policy, traj, sigmas) -> tuple[None, int, dict]:
        """Extra rewards the estimator needs besides the final ones: none."""
        return None, 0, {}

    def estimate(self, rows) -> tuple[torch.Tensor, dict]:
        """Advantages of the global rows `rows` (a flowpo.trajectory.Trajectory) → ([N, T], stats)."""
        a = self.cfg.advantage
        adv = aggregate_advantages(rows.raw, self.rewards.weights, rows.group_ids,
                                   aggregation=self.cfg.reward.aggregation, std=a.std, eps=a.eps, clip=a.clip)
        return adv[:, None].expand(-1, rows.train.shape[1]), {}


class StepwiseEstimator:
    """advantage.kind=stepwise: Stepwise-Flow-GRPO's per-step gains of Tweedie intermediate rewards
    (arXiv 2603.28718; `flowpo.stepwise`, `aggregate_stepwise_advantages`)."""

    def __init__(self, cfg, rewards):
        self.cfg, self.rewards = cfg, rewards

    def intermediate(self, policy, traj, sigmas) -> tuple[torch.Tensor, int, dict]:
        """r_t = R(x̂0(x_t)) before and after every trained step of this rank's rows → [n, T+1, K]."""
        from flowpo.stepwise import intermediate_rewards

        a = self.cfg.advantage
        sr, _, extra = intermediate_rewards(policy, traj.states, traj.train, sigmas, traj.cond, traj.prompts, traj.raw,
                                            self.rewards.score, substeps=a.substeps,
                                            guidance=self.cfg.sample.guidance, batch_size=a.estimate_batch_size,
                                            metadata=traj.metadata)
        return sr, extra, {"stepwise/nfe": extra}

    def estimate(self, rows) -> tuple[torch.Tensor, dict]:
        a = self.cfg.advantage
        sr, valid = rows.step_rewards, rows.train.cpu()  # valid: the steps a row trains (replayed: keeps)
        adv = aggregate_stepwise_advantages(sr, self.rewards.weights, rows.group_ids,
                                            aggregation=self.cfg.reward.aggregation, normalize=a.normalize,
                                            eps=a.eps, clip=a.clip, valid=valid, std=a.gain_std)  # [N, T]
        comb = self.rewards.combine(sr)
        gains = (comb[:, 1:] - comb[:, :-1]).abs() * valid
        by_step = gains.sum(0) / valid.sum(0).clamp_min(1)
        return adv, {"stepwise/mean_abs_gain_by_step": [round(float(x), 5) for x in by_step]}


ESTIMATORS: dict[str, type] = {"group": GroupEstimator, "stepwise": StepwiseEstimator}
"""advantage.kind → estimator class (the only list of the names)."""
