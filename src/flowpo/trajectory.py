"""The one container of an iteration's rows, from the rollout to the loss.

The rollout makes a `Trajectory` of this rank's fresh rows; the rewards fill `raw` (and the
stepwise estimator `step_rewards`); `gather` gives every rank all rows in global order; replay
appends rows (`cat`); the advantage part fills `adv`; `update_rows` takes this rank's share for the
objective, which fills the π_old it does not know yet. Every per-row value is one field here, and
`select`, `cat` and `gather` handle every field alike, so a new per-row value is one line.

Shapes: N rows, T steps, D latent dims, K rewards, F scorer detail fields.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from flowpo.importance import WeightRule
from flowpo.lockstep import agreed_steps
from flowpo.policy.base import Cond, cat_cond, select_cond


def _row(default=None):
    """A per-row field (first dim N): selected, concatenated and gathered with the rows."""
    return field(default=default, metadata={"row": True})


@dataclass
class Chunks:
    """How a rank's rows go through the model: the rollout's chunks, then the replayed rows'."""

    rows: list[torch.Tensor]      # local row indices of each chunk (a rank's part of a global chunk)
    ids: list[int]                # global index of each chunk
    total: int                    # global chunks over all ranks
    fresh: int | None = None      # the first `fresh` chunks are the rollout's own (None: all of them)
    steps: list[list[int]] | None = None  # the steps each chunk trains (any rank's, under lock-step): host copy


@dataclass
class Trajectory:
    """Rows of one iteration (this rank's, or all ranks' after `gather`)."""

    prompts: list[str] = _row()               # [N]
    metadata: list[dict] = _row()             # [N] the prompts' metadata (flowpo.prompts)
    group_ids: torch.Tensor = _row()          # [N] long: global group (same prompt, same iteration)
    row_ids: torch.Tensor = _row()            # [N] long: global row id (fresh 0..N−1, replayed N + j); seeds per-row noise
    versions: torch.Tensor = _row()           # [N] long: the iteration that sampled the row
    states: torch.Tensor = _row()             # [N, T+1, *D] x_t on the grid (zeros where not visited or not kept)
    log_probs: torch.Tensor = _row()          # [N, T] behaviour log-probs log β(x_{t+1}|x_t) (0 on ODE steps)
    sde: torch.Tensor | None = _row()         # [N, T] bool: stochastic steps of the plan (fresh rows)
    train: torch.Tensor = _row()              # [N, T] bool: trained steps ⊆ sde (replayed rows: the kept ones)
    final: torch.Tensor = _row()              # [N, *D] final latents x_T
    raw: torch.Tensor | None = _row()         # [N, K] raw rewards (CPU)
    detail: torch.Tensor | None = _row()      # [N, F] the scorers' extra fields (NaN where a call gave none)
    step_rewards: torch.Tensor | None = _row()  # [N, T+1, K] intermediate rewards (stepwise credit)
    adv: torch.Tensor | None = _row()         # [N, T] advantages
    old_log_probs: torch.Tensor | None = _row()  # [N, T] log π_old: the iteration's starting weights
    old_known: torch.Tensor | None = _row()   # [N, T] bool: old_log_probs known (fresh rows: = log_probs)
    weights: torch.Tensor | None = _row()     # [N, T] detached importance weights (1 until the objective sets them)
    cond: Cond | None = _row()                # rows [N, ...] of the policy's conditioning (local rows only)
    uncond: torch.Tensor | None = _row()      # [N, T, *D] the rollout's unconditional velocities at its
    #                                           stochastic steps (model.cfg_uncond=reuse; local rows only,
    #                                           zeros for replayed rows; flowpo.guided)
    chunks: Chunks | None = None              # the model-call layout (local rows only)
    rule: WeightRule | None = None            # the importance-weight rule of rows whose π_old is unknown

    @property
    def n(self) -> int:
        return len(self.prompts)

    def replace(self, **changes) -> Trajectory:
        return dataclasses.replace(self, **changes)


ROW_FIELDS = tuple(f.name for f in dataclasses.fields(Trajectory) if f.metadata.get("row"))
LOCAL_FIELDS = ("cond", "uncond")
"""Per-row fields only the rank that sampled the rows has: `gather` leaves them out."""


def make_chunks(n: int, batch_size: int, generator: torch.Generator | None) -> list[torch.Tensor]:
    """Split rows 0..n−1 into chunks of at most batch_size, in a random (seeded) order."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def _take(value, idx: torch.Tensor):
    if value is None:
        return None
    if isinstance(value, list):
        return [value[i] for i in idx.tolist()]
    if isinstance(value, dict):
        return select_cond(value, idx)
    return value[idx.to(value.device)]


def select(traj: Trajectory, idx: torch.Tensor) -> Trajectory:
    """Rows `idx` [M] long (every per-row field; no chunk layout)."""
    return traj.replace(**{name: _take(getattr(traj, name), idx) for name in ROW_FIELDS}, chunks=None)


def _cat(values: list, sizes: list[int]):
    known = [v for v in values if v is not None]
    if not known:
        return None
    if isinstance(known[0], list):
        return [x for v in values for x in v]
    if isinstance(known[0], dict):
        return cat_cond(values) if len(known) == len(values) else None
    ref = known[0]  # a part without the field: zeros of the field's row shape (e.g. no step rewards)
    return torch.cat([v if v is not None else ref.new_zeros((n, *ref.shape[1:])) for v, n in zip(values, sizes)])


def cat(parts: list[Trajectory]) -> Trajectory:
    """The rows of `parts` one after the other (chunk layout and rule of the first part)."""
    sizes = [p.n for p in parts]
    return parts[0].replace(**{name: _cat([getattr(p, name) for p in parts], sizes) for name in ROW_FIELDS},
                            rule=next((p.rule for p in parts if p.rule is not None), None))


def gather(traj: Trajectory, dist) -> Trajectory:
    """Every rank's rows in global (rank) order, on every rank; one process: `traj` itself.
    `dist`: flowpo.training.distributed.Dist. The LOCAL_FIELDS and chunk layout stay local (None)."""
    if dist.world == 1:
        return traj.replace(uncond=None)
    out, widthless = {}, []
    for name in ROW_FIELDS:
        v = getattr(traj, name)
        if name in LOCAL_FIELDS or v is None:
            out[name] = None
        elif isinstance(v, list):
            out[name] = [x for part in dist.all_gather_objects(v) for x in part]
        elif v.dim() > 1 and 0 in v.shape[1:]:  # e.g. no detail fields: nothing to send
            widthless.append(name)
        else:
            out[name] = dist.all_gather_cat(v)
    n = len(out["prompts"])
    for name in widthless:
        v = getattr(traj, name)
        out[name] = v.new_zeros((n, *v.shape[1:]))
    return traj.replace(**out, chunks=None)


def to_device(traj: Trajectory, device) -> Trajectory:
    """The fields the model and the loss read, on `device` (rewards and ids stay on the CPU)."""
    names = ("states", "log_probs", "train", "final", "adv", "old_log_probs", "old_known", "weights", "uncond")
    return traj.replace(**{k: getattr(traj, k).to(device) for k in names if getattr(traj, k) is not None})


def update_rows(mine: Trajectory, rows: Trajectory, n_fresh: int, dist, encode, batch_size: int) -> Trajectory:
    """This rank's rows for the update, on the model's device: its fresh rows `mine` (with their
    advantages from `rows`, the global rows), then its contiguous share [r·R/W, (r+1)·R/W) of the R
    replayed rows of `rows`, in chunks of their own after the fresh ones. `encode(prompts, metadata)`:
    the rows' conditioning (flowpo.policy.edit.encode_rows); `dist`: flowpo.training.distributed.Dist."""
    dev = mine.states.device
    mine = mine.replace(adv=rows.adv[mine.row_ids])
    R = rows.n - n_fresh
    if R == 0:
        return to_device(mine, dev)
    share = slice(dist.rank * R // dist.world, (dist.rank + 1) * R // dist.world)
    rep = select(rows, n_fresh + torch.arange(R)[share])
    cond = encode(rep.prompts, rep.metadata) if rep.n else {k: v[:0] for k, v in mine.cond.items()}
    rep = to_device(rep, dev).replace(cond=cond, sde=None)
    g_chunks = make_chunks(R, batch_size, None)
    chunks, ids = dist.local_chunks(g_chunks, share)
    c = mine.chunks
    layout = Chunks(c.rows + [r + mine.n for r in chunks], c.ids + [c.total + i for i in ids], c.total + len(g_chunks),
                    fresh=len(c.rows))
    return to_device(cat([mine, rep]), dev).replace(chunks=layout)


def host_steps(b: Trajectory, dist, lockstep: bool) -> tuple[Trajectory, list[list[int]]]:
    """One device→host copy of the trained rows per (chunk, step) → (b with `Chunks.steps`: the
    steps each local chunk's calls run, any rank's under lock-step; all ranks' trained rows per
    global chunk [total][T], the same list on every rank)."""
    c = b.chunks
    T = b.train.shape[1]
    mine = torch.stack([b.train[r].sum(0) for r in c.rows]).cpu() if c.rows else torch.zeros(0, T, dtype=torch.long)
    table = torch.zeros(c.total, T, dtype=torch.long)                            # [total, T] by global chunk id
    table[torch.tensor(c.ids, dtype=torch.long)] = mine.long()
    every = dist.all_reduce_sum(table).tolist()                                  # (ranks may hold different chunks)
    mine = mine.tolist()
    calls = [every[g] for g in c.ids] if lockstep else mine
    steps = [[t for t, n in enumerate(row) if n] for row in calls]
    return b.replace(chunks=dataclasses.replace(c, steps=steps)), every


def trained_steps(b: Trajectory, idx: torch.Tensor, policy) -> list[int]:
    """The steps chunk `idx` (one of b.chunks.rows) trains, on any rank under lock-step: the host
    copy the update made for all chunks at once (Chunks.steps), else read from the mask (a sync)."""
    if b.chunks is not None and b.chunks.steps is not None:
        for c, steps in zip(b.chunks.rows, b.chunks.steps):
            if c is idx:
                return steps
    return agreed_steps(policy, b.train[idx].any(0))


def minibatch_of(chunk_id: int, n_chunks: int, minibatches: int) -> int:
    """The minibatch that global chunk `chunk_id` of `n_chunks` trains in: chunk_id mod the number
    of minibatches per pass (train.minibatches, at most one per chunk, since a minibatch is whole
    chunks). The same on every rank. Minibatch 0 of the first pass runs before the update's first
    optimizer step, at the iteration's starting weights."""
    return chunk_id % max(1, min(minibatches, n_chunks))
