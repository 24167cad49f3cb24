"""Rollouts: sample trajectories of a group of prompts under a step plan, recording what the loss
re-scores.

For each step t of the training grid σ_0 = 1 > … > σ_T = 0 and each row i:
    v = v_θ(x_t, σ_t | c_i)                         (guidance inside the policy)
    x_{t+1} = kernel(x_t, v, σ_t, σ_{t+1})           if plan.sde[i, t]   (log-prob recorded)
    x_{t+1} = x_t + (σ_{t+1} − σ_t)·v               otherwise (Euler ODE)
With `solver.grid=dpm2m` the deterministic steps (the ODE kernel, or a plan's ODE rows) are
DPM-Solver++ 2M steps instead, their history carried along the grid (DiffusionNFT's rollout).
After the last stochastic step e, a `dpm2m` solver may replace the remaining ODE steps by a
shorter segment (MixGRPO-Flash, arXiv 2507.21802 §3.3), optionally continuing that history.

All randomness comes from per-row noise drawn from per-row generators, so a sample depends only on
(seed, iteration, global row index): one process and N processes draw the same trajectories.
`Rollout` (the part) draws everything an iteration samples from those streams: the prompts, the
plan, the initial and step noise, the chunks. Rows are processed in fixed chunks; the loss reuses
the same chunks so that, on the first update of fresh samples, π_θ's log-prob is recomputed
bit-identically (ratio exactly 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from flowpo.lockstep import agreed_count, agreed_steps
from flowpo.policy.base import Cond, Policy, select_cond
from flowpo.policy.edit import encode_rows
from flowpo.sde import ode_step
from flowpo.solvers import Multistep, solve
from flowpo.trajectory import Chunks, Trajectory, make_chunks


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
    guided: Callable | None = None  # flowpo.guided.GuidedVelocity (None: the policy's velocity at `guidance`)
    grid: str = "euler"         # solver.grid: the deterministic grid steps, euler or dpm2m
    history: bool = False       # keep the 2M history along the grid (solver.grid=dpm2m or a warm-started tail)


@torch.no_grad()
def sample(policy: Policy, cond: Cond, sigmas: torch.Tensor, spec: RolloutSpec, *, x_init: torch.Tensor,
           step_noise: torch.Tensor | None, sde: torch.Tensor, train: torch.Tensor, chunks: list[torch.Tensor],
           on_chunk: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> tuple[Trajectory, int]:
    """Roll out N rows → (their Trajectory: states, log-probs, train mask, final latents and cond;
    model evaluations). x_init [N, *D]; step_noise [N, T, *D] (None: ODE everywhere).

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
    split = bool(getattr(spec.guided, "rollout", False))                 # flowpo.guided: split the SDE steps
    keep_uncond = split and spec.guided.reuse
    uncond = torch.zeros((n, T, *dims), device=dev) if keep_uncond else None  # [N, T, *D] (model.cfg_uncond=reuse)
    states[:, 0] = x_init.float()
    nfe = 0
    sde_any = torch.zeros(T, dtype=torch.bool, device=dev)  # [T] (over all ranks under lock-step)
    sde_any[agreed_steps(policy, sde.any(0))] = True
    sde_steps = sde_any.tolist()
    last_sde = max((t + 1 for t, on in enumerate(sde_steps) if on), default=0)
    # grid steps run one by one; after `stop` the tail part (a compressed solver segment) may take over
    stop = spec.tail.stop(T, last_sde)
    deterministic_kernel = kern is ode_step
    for idx in chunks:
        xc = x_init[idx].float()
        cond_c = select_cond(cond, idx)
        hist = Multistep() if spec.history else None
        for t in range(stop):
            s, s_next = float(sigmas[t]), float(sigmas[t + 1])
            sig = torch.full((len(idx),), s, device=dev)
            if split and sde_steps[t]:
                v, v_u = spec.guided(xc, sig, cond_c, keep=True)
                if keep_uncond:
                    uncond[idx, t] = v_u
            else:
                v = policy.velocity(xc, sig, cond_c, guidance)
            nfe += len(idx) * policy.evals_per_row(guidance)
            rows_sde, x_in = sde[idx, t], xc
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
            if hist is not None:  # the 2M step from this step's input x (the history is kept either way)
                x_dpm = hist.step(x_in, v, s, s_next)
                if spec.grid == "dpm2m":
                    det = torch.ones_like(rows_sde) if deterministic_kernel else ~rows_sde  # [n_c]
                    xc = torch.where(det.view(-1, *([1] * len(dims))), x_dpm, xc)
            states[idx, t + 1] = xc
        if stop < T:
            xc, evals = spec.tail.finish(chunked_velocity(policy, cond_c, [torch.arange(len(idx))], guidance), xc,
                                         float(sigmas[stop]), T - stop, hist.history if hist is not None else None)
            nfe += evals * len(idx) * policy.evals_per_row(guidance)
        final[idx] = xc
        if on_chunk is not None and len(idx):  # (a rank's empty part of a lock-stepped chunk: nothing to score)
            on_chunk(idx, xc)
    return Trajectory(cond=cond, states=states, log_probs=log_probs, train=train, final=final, uncond=uncond), nfe


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
    n = x_init.shape[0]
    chunks = make_chunks(n, batch_size, None)
    # lock-step: as many chunk calls as the rank with the most rows (the others run empty chunks)
    chunks += [torch.zeros(0, dtype=torch.long)] * (agreed_count(policy, len(chunks)) - len(chunks))
    x, steps = solve("euler", chunked_velocity(policy, cond, chunks, guidance), x_init, sigmas)
    return x, steps * n * policy.evals_per_row(guidance)


class Rollout:
    """The rollout part: everything an iteration samples, drawn from streams of (seed, iteration,
    row): the prompts (`heads`), the rows and their plan (`rows`), the initial and step noise, the
    chunks; then the sampling itself (`sample`), under the objective's behaviour weights."""

    def __init__(self, policy, sigmas: torch.Tensor, spec: RolloutSpec, plan, pool, sample_cfg, seed: int, dist,
                 device, sampling):
        self.policy, self.sigmas, self.spec, self.plan, self.pool = policy, sigmas, spec, plan, pool
        self.s, self.seed, self.dist, self.device, self.sampling = sample_cfg, seed, dist, device, sampling

    def heads(self, it: int):
        """The iteration's B prompts, one per group (a flowpo.prompts.PromptSet)."""
        gen = torch.Generator().manual_seed(stream_seed(self.seed, it, 1))
        return self.pool.take(torch.randint(len(self.pool), (self.s.prompts_per_iteration,), generator=gen))

    def rows(self, it: int, heads, counts: torch.Tensor) -> tuple[Trajectory, dict]:
        """This rank's fresh rows (`counts` [B] per group, all ranks' rows split in global order),
        their plan and chunk layout, before sampling → (rows, plan stats)."""
        B = len(heads)
        groups = torch.arange(B).repeat_interleave(counts)                                  # [N]
        drawn = heads.take(groups)
        n_all = len(drawn)
        plan = self.plan(it, n_all, groups, torch.Generator().manual_seed(stream_seed(self.seed, it, 2)))
        local = self.dist.split(n_all)
        # chunks are drawn over the N global rows; each rank runs its part of each (distributed.py)
        g_chunks = make_chunks(n_all, self.s.batch_size, torch.Generator().manual_seed(stream_seed(self.seed, it, 5)))
        chunks, ids = self.dist.local_chunks(g_chunks, local)
        rows = Trajectory(prompts=drawn.texts[local], metadata=drawn.meta[local], group_ids=groups[local],
                          row_ids=torch.arange(n_all)[local], versions=torch.full((local.stop - local.start,), it),
                          sde=plan.sde[local], train=plan.train[local], chunks=Chunks(chunks, ids, len(g_chunks)))
        stats = {"plan/trained_steps": float(plan.train.sum()) / n_all}
        if plan.window is not None:
            stats["plan/window_start"] = plan.window[0]
        return rows, stats

    def sample(self, it: int, rows: Trajectory, on_chunk=None) -> tuple[Trajectory, int]:
        """Sample `rows` (their plan and chunks) → (the rows with states, log-probs, final latents and
        cond, π_old known and weights 1; model evaluations). on_chunk: see `sample`."""
        s, dims, T, dev = self.s, self.policy.latent_shape, self.sigmas.numel() - 1, self.device
        ids = rows.row_ids.tolist()
        init_seeds = [stream_seed(self.seed, it, 3, g if s.shared_noise else 10_000 + i)
                      for g, i in zip(rows.group_ids.tolist(), ids)]
        x_init = row_noise(init_seeds, dims).to(dev)                                        # [n, *D]
        step_noise = row_noise([stream_seed(self.seed, it, 4, i) for i in ids], (T, *dims)).to(dev)  # [n, T, *D]
        cond = encode_rows(self.policy, rows.prompts, rows.metadata)
        self.policy.module.eval()
        with self.sampling(it):
            out, nfe = sample(self.policy, cond, self.sigmas, self.spec, x_init=x_init, step_noise=step_noise,
                              sde=rows.sde, train=rows.train, chunks=rows.chunks.rows, on_chunk=on_chunk)
        n = rows.n
        return rows.replace(cond=cond, states=out.states, log_probs=out.log_probs, train=out.train, final=out.final,
                            uncond=out.uncond,
                            old_log_probs=out.log_probs, old_known=torch.ones((n, T), dtype=torch.bool, device=dev),
                            weights=torch.ones((n, T), device=dev)), nfe
