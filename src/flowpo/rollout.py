"""Rollouts: sample trajectories of a group of prompts under a step plan, recording what the loss
re-scores.

For each step t of the training grid σ_0 = 1 > … > σ_T = 0 and each row i:
    v = v_θ(x_t, σ_t | c_i)                         (guidance inside the policy)
    x_{t+1} = kernel(x_t, v, σ_t, σ_{t+1})           if plan.sde[i, t]   (log-prob recorded)
    x_{t+1} = x_t + (σ_{t+1} − σ_t)·v               otherwise (Euler ODE)
After the last stochastic step e, a `dpm2m` solver may replace the remaining ODE steps by a
shorter segment (MixGRPO-Flash, arXiv 2507.21802 §3.3).

All randomness comes from per-row noise drawn from per-row generators, so a sample depends only on
(seed, iteration, global row index): one process and N processes draw the same trajectories.
Rows are processed in fixed chunks; the loss reuses the same chunks so that, on the first update of
fresh samples, π_θ's log-prob is recomputed bit-identically (ratio exactly 1).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from flowpo.policy.base import Cond, Policy, select_cond
from flowpo.sde import ode_step
from flowpo.training.distributed import agreed_count, agreed_steps


@dataclass
class Rollout:
    """One iteration's trajectories (this rank's rows). Shapes: N rows, T steps, D latent dims."""

    prompts: list[str]              # [N]
    group_ids: torch.Tensor         # [N] long, global group index (same prompt & iteration)
    cond: Cond                      # rows [N, ...]
    sigmas: torch.Tensor            # [T+1] training grid
    states: torch.Tensor            # [N, T+1, *D] fp32; x_t on the grid (zeros where not visited)
    log_probs: torch.Tensor         # [N, T] fp32 behaviour log-probs (0 on ODE steps)
    sde: torch.Tensor               # [N, T] bool
    train: torch.Tensor             # [N, T] bool, ⊆ sde
    final: torch.Tensor             # [N, *D] final latent x_T
    chunks: list[torch.Tensor]      # row-index chunks used for every model call
    nfe: int = 0                    # model evaluations (rows × evals per row)
    metadata: list[dict] = field(default_factory=list)  # [N] the prompts' metadata ([] = none)


def make_chunks(n: int, batch_size: int, generator: torch.Generator | None) -> list[torch.Tensor]:
    """Split rows 0..n−1 into chunks of at most batch_size, in a random (seeded) order."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def row_noise(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """One standard-normal tensor of `shape` per seed → [len(seeds), *shape]."""
    out = torch.empty((len(seeds), *shape))
    for i, s in enumerate(seeds):
        g = torch.Generator().manual_seed(int(s))
        out[i] = torch.randn(shape, generator=g)
    return out


def stream_seed(*parts: int) -> int:
    """Deterministic 63-bit seed from integers (so every stream is a function of seed, iteration, row)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


@dataclass(frozen=True)
class RolloutSpec:
    """How a rollout steps: the kernel function (flowpo.sde), its settings, and the tail part that
    may replace the ODE steps after the last stochastic one (flowpo.solvers.TAILS)."""

    kernel: Callable
    noise_level: float
    guidance: float
    reduction: str
    tail: object


@torch.no_grad()
def sample(policy: Policy, cond: Cond, sigmas: torch.Tensor, spec: RolloutSpec, *, x_init: torch.Tensor,
           step_noise: torch.Tensor | None, sde: torch.Tensor, train: torch.Tensor, chunks: list[torch.Tensor],
           prompts: list[str] | None = None, group_ids: torch.Tensor | None = None,
           metadata: list[dict] | None = None,
           on_chunk: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> Rollout:
    """Roll out N rows. x_init [N, *D]; step_noise [N, T, *D] (None: ODE everywhere).

    Chunk by chunk: each chunk runs every step (and the tail) before the next starts, so
    `on_chunk(rows, x_final [len(rows), *D])` can hand a finished chunk to the rewards while the
    next one samples (reward.overlap). A chunk's numbers do not depend on the order."""
    n, T = x_init.shape[0], sigmas.numel() - 1
    dims = tuple(x_init.shape[1:])
    kern, guidance, noise_level, reduction = spec.kernel, spec.guidance, spec.noise_level, spec.reduction
    dev = x_init.device
    sde, train = sde.to(dev), train.to(dev)
    states = torch.zeros((n, T + 1, *dims), device=dev)
    log_probs = torch.zeros((n, T), device=dev)
    final = torch.empty((n, *dims), device=dev)
    states[:, 0] = x_init.float()
    nfe = 0
    sde_any = torch.zeros(T, dtype=torch.bool, device=dev)  # [T] (over all ranks under lock-step)
    sde_any[agreed_steps(policy, sde.any(0))] = True
    last_sde = int(torch.nonzero(sde_any).max()) + 1 if sde_any.any() else 0
    # grid steps run one by one; after `stop` the tail part (a compressed solver segment) may take over
    stop = spec.tail.stop(T, last_sde)
    for idx in chunks:
        xc = x_init[idx].float()
        cond_c = select_cond(cond, idx)
        for t in range(stop):
            s, s_next = float(sigmas[t]), float(sigmas[t + 1])
            sig = torch.full((len(idx),), s, device=dev)
            v = policy.velocity(xc, sig, cond_c, guidance)
            nfe += len(idx) * policy.evals_per_row(guidance)
            rows_sde = sde[idx, t]
            if rows_sde.all():
                st = kern(xc, v, s, s_next, noise_level, noise=step_noise[idx, t], reduction=reduction)
                xc, log_probs[idx, t] = st.sample, st.log_prob
            elif rows_sde.any():  # a per-row plan (DanceGRPO-style) mixes SDE and ODE rows in a chunk
                st = kern(xc, v, s, s_next, noise_level, noise=step_noise[idx, t], reduction=reduction)
                od = ode_step(xc, v, s, s_next, noise_level)
                mask = rows_sde.view(-1, *([1] * len(dims)))
                xc = torch.where(mask, st.sample, od.sample)
                log_probs[idx, t] = torch.where(rows_sde, st.log_prob, torch.zeros_like(st.log_prob))
            else:
                xc = ode_step(xc, v, s, s_next, noise_level).sample
            states[idx, t + 1] = xc
        if stop < T:
            xc, evals = spec.tail.finish(chunked_velocity(policy, cond_c, [torch.arange(len(idx))], guidance), xc,
                                         float(sigmas[stop]), T - stop)
            nfe += evals * len(idx) * policy.evals_per_row(guidance)
        final[idx] = xc
        if on_chunk is not None and len(idx):  # (a rank's empty part of a lock-stepped chunk: nothing to score)
            on_chunk(idx, xc)
    return Rollout(prompts=prompts or [], group_ids=group_ids if group_ids is not None else torch.zeros(n, dtype=torch.long),
                   cond=cond, sigmas=sigmas, states=states, log_probs=log_probs, sde=sde, train=train,
                   final=final, chunks=chunks, nfe=nfe, metadata=list(metadata or []))


def chunked_velocity(policy: Policy, cond: Cond, chunks: list[torch.Tensor], guidance: float):
    """velocity_fn(x [N, *D], sigma [N]) for `flowpo.solvers`: the policy run chunk by chunk."""

    def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        for idx in chunks:
            out[idx] = policy.velocity(x[idx], sigma[idx], select_cond(cond, idx), guidance)
        return out

    return velocity


@torch.no_grad()
def ode_sample(policy: Policy, cond: Cond, sigmas: torch.Tensor, x_init: torch.Tensor, guidance: float,
               batch_size: int) -> tuple[torch.Tensor, int]:
    """Deterministic Euler sampling (evaluation, regenerated replay tails): no states are stored.
    Returns (x_0 [N, *D], nfe)."""
    from flowpo.solvers import solve

    n = x_init.shape[0]
    chunks = make_chunks(n, batch_size, None)
    # lock-step: as many chunk calls as the rank with the most rows (the others run empty chunks)
    chunks += [torch.zeros(0, dtype=torch.long)] * (agreed_count(policy, len(chunks)) - len(chunks))
    x, steps = solve("euler", chunked_velocity(policy, cond, chunks, guidance), x_init, sigmas)
    return x, steps * n * policy.evals_per_row(guidance)
