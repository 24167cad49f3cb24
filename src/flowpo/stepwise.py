"""Stepwise-Flow-GRPO intermediate rewards (arXiv 2603.28718): r_t = R(x̂0(x_t)).

x̂0(x_t) comes from T' Euler ODE sub-steps from σ_t to 0 on the uniform sub-grid
σ_t·(1 − k/T'), k = 0..T' (T' = 1 is Tweedie's x̂0 = x − σ·v). All states that need an estimate
are processed together: each sub-step is one batched pass over every (row, state) pair (chunked by
`batch_size`), then one decode and one reward call, so the extra cost is T' large model calls and
one reward call per iteration instead of T·T' small ones.

Pairs whose inputs are bit-identical are estimated and scored once (`distinct_pairs`): the same
step t (so the same σ), the same state tensor, the same conditioning rows, prompt and metadata.
The estimate is a deterministic ODE of those inputs and a reward of (image, prompt, metadata),
so the copies would repeat the same numbers. With `sample.shared_noise` (the stepwise presets) all
G rows of a group start from the same x_init: their state-0 estimates are one estimate, G − 1
fewer per group (and states reached by identical ODE steps before the first stochastic one, when
the rollout computed them bit-identically). Only rows of one rank are compared; under lock-step
the ranks agree on the number of calls as before (`agreed_count` of the distinct pairs).
"""
from __future__ import annotations

import torch

from flowpo.policy.base import Cond, Policy, select_cond
from flowpo.lockstep import agreed_count


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


def distinct_pairs(x: torch.Tensor, ts: torch.Tensor, rows: torch.Tensor, cond: Cond, prompts: list[str],
                   metadata: list[dict] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Which of M (row, step) pairs have bit-identical inputs → (keep [U], inverse [M]).

    x [M, *D] the pairs' states, ts [M] their steps, rows [M] their rows (indices into `cond`,
    `prompts`, `metadata`). Two pairs are one when their steps, states and conditioning rows are
    equal (`torch.equal`) and their prompts and metadata compare equal. keep: the first pair of
    each set, in the original order (positions in 0..M−1); inverse: the position in `keep` of each
    pair's representative, so that values of the kept pairs v [U] give every pair's value v[inverse].
    An exact integer fingerprint of each state's bits (the sum of its 32-bit words) narrows the
    comparisons to candidates; -0.0 and 0.0 (or NaNs) count as different, which only misses a merge.
    """
    m = x.shape[0]
    inverse = torch.empty(m, dtype=torch.long)
    if m == 0:
        return torch.zeros(0, dtype=torch.long), inverse
    words = x.float().contiguous().reshape(m, -1).view(torch.int32)
    finger = words.sum(1, dtype=torch.int64).cpu().tolist()                 # [M] exact, order-free
    ts_l, rows_l = ts.tolist(), rows.tolist()
    reps: dict[tuple, list[int]] = {}   # (t, prompt, fingerprint) → positions in `keep`
    keep: list[int] = []

    def same(j: int, k: int) -> bool:
        a, b = rows_l[j], rows_l[k]
        if metadata and metadata[a] != metadata[b]:
            return False
        if not all(torch.equal(c[a], c[b]) for c in cond.values()):
            return False
        return torch.equal(x[j], x[k])

    for j in range(m):
        key = (ts_l[j], prompts[rows_l[j]], finger[j])
        cands = reps.setdefault(key, [])
        hit = next((u for u in cands if same(keep[u], j)), None)
        if hit is None:
            hit = len(keep)
            keep.append(j)
            cands.append(hit)
        inverse[j] = hit
    return torch.tensor(keep, dtype=torch.long), inverse


@torch.no_grad()
def intermediate_rewards(policy: Policy, states: torch.Tensor, train: torch.Tensor, sigmas: torch.Tensor,
                         cond: Cond, prompts: list[str], final_reward: torch.Tensor, score_fn, *,
                         substeps: int, guidance: float, batch_size: int,
                         metadata: list[dict] | None = None,
                         dedupe: bool = True) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Estimates before and after every trained step.

    states [N, T+1, *D], train [N, T], final_reward [N] or [N, K]; score_fn(images, prompts[,
    metadata]) → [M] (metadata passed when given: one dict per row)
    or [M, K] (the same trailing shape as final_reward: one reward, or the K raw rewards so that
    multi-reward gains can be normalised per reward). Returns (step_rewards [N, T+1] or
    [N, T+1, K], valid [N, T] = train, nfe). r_T is the true final reward; entries that no trained
    step needs are 0. dedupe: estimate and score pairs with bit-identical inputs once
    (`distinct_pairs`; False runs every pair, the path before deduplication, kept for comparison).
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
    dev = states.device
    x = states[rows.to(dev), ts.to(dev)]                                     # [M, *D]
    if dedupe:
        keep, inverse = distinct_pairs(x, ts, rows, cond, prompts, metadata)  # [U], [M]
        x, rows_u, ts_u = x[keep.to(dev)], rows[keep], ts[keep]
    else:
        inverse, rows_u, ts_u = torch.arange(rows.numel()), rows, ts
    nfe = 0
    if agreed_count(policy, rows_u.numel()):  # lock-step: a rank with nothing to estimate still runs the calls
        rows_d = rows_u.to(dev)
        x0, nfe = tweedie_estimate(policy, x, sigmas[ts_u].float().to(dev), select_cond(cond, rows_d),
                                   substeps=substeps, guidance=guidance, batch_size=batch_size)
        sel = [int(i) for i in rows_u]
        if sel:
            images = policy.decode(x0)
            scores = score_fn(images, [prompts[i] for i in sel], *([[metadata[i] for i in sel]] if metadata else []))
            step_rewards[rows, ts] = torch.as_tensor(scores).float().cpu()[inverse]
    return step_rewards, train.clone(), nfe
