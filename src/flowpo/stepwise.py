"""Stepwise-Flow-GRPO intermediate rewards (arXiv 2603.28718): r_t = R(x̂0(x_t)).

x̂0(x_t) comes from T' Euler ODE sub-steps from σ_t to 0 on the uniform sub-grid
σ_t·(1 − k/T'), k = 0..T' (T' = 1 is Tweedie's x̂0 = x − σ·v). All states that need an estimate
are processed together: each sub-step is one batched pass over every (row, state) pair (chunked by
`batch_size`), then one decode and one reward call, so the extra cost is T' large model calls and
one reward call per iteration instead of T·T' small ones.
"""
from __future__ import annotations

import torch

from flowpo.policy.base import Cond, Policy, select_cond
from flowpo.training.distributed import agreed_count


@torch.no_grad()
def tweedie_estimate(policy: Policy, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, *, substeps: int,
                     guidance: float, batch_size: int) -> tuple[torch.Tensor, int]:
    """x [M, *D] at noise levels sigma [M] → (x̂0 [M, *D], model evaluations)."""
    x = x.float().clone()
    m = x.shape[0]
    nfe = 0
    shape = (-1,) + (1,) * (x.dim() - 1)
    m_run = agreed_count(policy, m)  # lock-step: the most rows of any rank (slices past m are empty)
    for k in range(substeps):
        s_k = sigma * (1 - k / substeps)            # [M]
        s_next = sigma * (1 - (k + 1) / substeps)   # [M]
        for a in range(0, m_run, batch_size):
            sl = slice(a, a + batch_size)
            v = policy.velocity(x[sl], s_k[sl], select_cond(cond, sl), guidance)
            x[sl] = x[sl] + (s_next[sl] - s_k[sl]).view(shape) * v
            nfe += x[sl].shape[0] * policy.evals_per_row(guidance)
    return x, nfe


@torch.no_grad()
def intermediate_rewards(policy: Policy, states: torch.Tensor, train: torch.Tensor, sigmas: torch.Tensor,
                         cond: Cond, prompts: list[str], final_reward: torch.Tensor, score_fn, *,
                         substeps: int, guidance: float, batch_size: int,
                         metadata: list[dict] | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Estimates before and after every trained step.

    states [N, T+1, *D], train [N, T], final_reward [N] or [N, K]; score_fn(images, prompts[,
    metadata]) → [M] (metadata passed when given: one dict per row)
    or [M, K] (the same trailing shape as final_reward: one reward, or the K raw rewards so that
    multi-reward gains can be normalised per reward). Returns (step_rewards [N, T+1] or
    [N, T+1, K], valid [N, T] = train, nfe). r_T is the true final reward; entries that no trained
    step needs are 0.
    """
    n, T = train.shape
    train = train.cpu()  # masks, indices and rewards on the CPU; states stay where the rollout put them
    need = torch.zeros((n, T + 1), dtype=torch.bool)
    need[:, :-1] |= train
    need[:, 1:] |= train
    need[:, T] = False  # the final reward is known
    rows, ts = torch.nonzero(need, as_tuple=True)  # [M], [M]
    step_rewards = torch.zeros((n, T + 1, *final_reward.shape[1:]))  # rewards live on the CPU
    step_rewards[:, T] = final_reward.cpu()
    nfe = 0
    if agreed_count(policy, rows.numel()):  # lock-step: a rank with nothing to estimate still runs the calls
        dev = states.device
        rows_d = rows.to(dev)
        x0, nfe = tweedie_estimate(policy, states[rows_d, ts.to(dev)], sigmas[ts].float().to(dev),
                                   select_cond(cond, rows_d),
                                   substeps=substeps, guidance=guidance, batch_size=batch_size)
        sel = [int(i) for i in rows]
        if sel:
            images = policy.decode(x0)
            scores = score_fn(images, [prompts[i] for i in sel], *([[metadata[i] for i in sel]] if metadata else []))
            step_rewards[rows, ts] = torch.as_tensor(scores).float().cpu()
    return step_rewards, train.clone(), nfe
