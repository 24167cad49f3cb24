"""What the objectives on final samples share (DiffusionNFT, AWM): forward-process noising of the
final latents at the plan's trained steps, the reference and old-policy predictions.

For every trained (row i, step t) of the update batch, with the final latent x0_i of the rollout
(or of the replayed trajectory) and a fresh ε_{i,t} ~ N(0, I) drawn from a per-row stream
(seed, iteration, global row id — so 1 and N processes draw the same):

    σ = σ_t (the rollout grid),   x_σ = (1 − σ)·x0 + σ·ε,   target velocity u = ε − x0.

The plan decides the training timesteps: the rollout's own grid steps it trains (DiffusionNFT and
AWM train on the sampler's discrete timesteps too; a MixGRPO window restricts them to the window).

Old policy (`objective.old_ramp`, `objective.old_max`): a soft copy of the trainable weights,
θ_old ← η_i·θ_old + (1 − η_i)·θ after iteration i's updates, η_i = min(old_ramp·i, old_max)
(DiffusionNFT's decay schedule, AWM's EMA anchor). old_ramp = 0 keeps θ_old = θ at the start of
every iteration and stores no copy.

The reference velocity v_ref (objective.ref_beta > 0) is computed once per (chunk, step) and
iteration and reused by the later passes of train.inner_epochs (`flowpo.objectives.reference`):
x_σ, the chunk's rows and the frozen reference are the same in every pass.
"""
from __future__ import annotations

import torch

from flowpo.objectives.reference import reference_cache
from flowpo.policy.base import select_cond
from flowpo.trajectory import trained_steps
from flowpo.ema import EMA, NoEMA


class FinalSampleObjective:
    """Base of the objectives that train v_θ on noised final samples. Subclasses define
    `_prepare(b, first)` (no-grad predictions before the first optimizer step; `first`: the chunk
    positions whose predictions at the current weights may come from the update's own first
    forward instead, through `_first_forward`) and
    `_term(b, idx, t, rows, sig, x, u, v, cond) -> (per-row loss [r], a `Stats` record)`. No
    likelihood: replayed rows keep weight 1."""

    def __init__(self, ctx, cfg):
        self.ctx, self.o = ctx, cfg.objective
        # θ_old: an EMA whose decay is the ramp's η (flowpo.ema); none kept when old_ramp = 0
        self.old = EMA(ctx.params, 0.0) if self.o.old_ramp > 0 else NoEMA()
        self.noise = None
        self.refs = reference_cache(cfg)  # v_ref per (chunk, step), kept across inner epochs
        self.sig = ctx.sigmas.tolist()    # [T+1] as floats, read once
        self._fresh: set[int] = set()  # ids of the chunks (in `first`) whose first forward is still to come

    # ------------------------------------------------------------------ protocol
    def sampling(self, iteration: int = 0):
        """The rollout samples with θ_old (DiffusionNFT's behaviour policy)."""
        return self.old.swapped()

    def begin(self, b, iteration: int, first=()) -> None:
        """Draw the iteration's noise and make the old predictions; `first`: the positions in b.chunks
        that the update trains before its first optimizer step (the objectives' protocol)."""
        from flowpo.rollout import row_noise, stream_seed

        T = b.train.shape[1]
        dims = tuple(b.final.shape[1:])
        self.noise = row_noise(self._noise_seeds(b, iteration, stream_seed), (T, *dims)).to(b.final.device)  # [M, T, *D]
        self.refs.clear()
        first = sorted(set(first))
        self._fresh = {id(b.chunks.rows[j]) for j in first}
        with torch.no_grad():
            self._prepare(b, first)

    def chunk_loss(self, b, idx: torch.Tensor, count: float) -> list:
        cond = select_cond(b.cond, idx)
        out = []
        first = id(idx) in self._fresh  # minibatch 0's first pass, before any optimizer step
        self._fresh.discard(id(idx))
        for t in trained_steps(b, idx, self.ctx.policy):
            rows = b.train[idx, t]                                            # [n_c]
            sig, x, u = self._noised(b, idx, t)
            v = self._velocity(x, sig, cond)
            if first:
                with torch.no_grad():
                    self._first_forward(b, idx, t, sig, x, u, v.detach(), cond)
            per, stat = self._term(b, idx, t, rows, sig, x, u, v, cond)
            per = per * b.weights[idx, t][rows].detach()
            (per.sum() / count).backward()
            out.append(stat)
        return out

    def end(self, iteration: int) -> dict:
        self.old.update(min(self.o.old_ramp * iteration, self.o.old_max))
        self.noise, self._fresh = None, set()
        self.refs.clear()
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"old.{i}": s for i, s in enumerate(self.old.shadow)}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        for i, s in enumerate(self.old.shadow):
            s.copy_(tensors[f"old.{i}"])

    # ------------------------------------------------------------------ helpers
    def _noise_seeds(self, b, iteration: int, stream_seed) -> list[int]:
        """One seed per row of the forward-process noise ε: the stream (seed, iteration, 6, global row)."""
        return [stream_seed(self.ctx.seed, iteration, 6, r) for r in b.row_ids.tolist()]  # (ids live on the host)

    def _noised(self, b, idx: torch.Tensor, t: int):
        """(σ_t, x_σ [n_c, *D], u = ε − x0 [n_c, *D]) for the rows of chunk `idx` at step t."""
        sig = self.sig[t]
        x0 = b.final[idx].float()
        eps = self.noise[idx, t]
        return sig, (1.0 - sig) * x0 + sig * eps, eps - x0

    def _velocity(self, x: torch.Tensor, sig: float, cond) -> torch.Tensor:
        c = self.ctx
        return c.guided(x, torch.full((x.shape[0],), sig, device=x.device), cond)[0].float()

    def _first_forward(self, b, idx: torch.Tensor, t: int, sig: float, x, u, v: torch.Tensor, cond) -> None:
        """The update's forward v [n_c, *D] (detached) of a chunk in `first` at step t, before any
        optimizer step: where a subclass takes the old predictions it left out of `_prepare`."""

    def _each_trained(self, b, skip=()):
        """(idx, t, rows, σ, x_σ, u, cond) over every chunk (but the positions in `skip`) and trained
        step of the batch."""
        for j, idx in enumerate(b.chunks.rows):
            if j in skip:
                continue
            cond = select_cond(b.cond, idx)
            for t in trained_steps(b, idx, self.ctx.policy):
                sig, x, u = self._noised(b, idx, t)
                yield idx, t, b.train[idx, t], sig, x, u, cond

    def _ref_velocity(self, x, sig, cond) -> torch.Tensor:
        """v_ref at x_σ (no grad, adapter disabled)."""
        with torch.no_grad(), self.ctx.policy.disable_adapter():
            return self._velocity(x, sig, cond)

    def _ref_term(self, v: torch.Tensor, x, sig, cond, rows, idx: torch.Tensor, t: int) -> torch.Tensor:
        """objective.ref_beta · mean_D (v_θ − v_ref)² per trained row (0 without a reference term);
        v_ref of chunk `idx` at step t comes from the reference cache after the first pass."""
        if self.o.ref_beta <= 0:
            return torch.zeros(int(rows.sum()), device=v.device)
        v_ref = self.refs.get(idx, t, lambda: self._ref_velocity(x, sig, cond))
        return self.o.ref_beta * ((v - v_ref) ** 2).flatten(1).mean(1)[rows]

    def _store(self, b, name: str, fn, skip=()) -> torch.Tensor | None:
        """Fill a [M, T, ...] table with fn(idx, t, rows, σ, x, u, cond) → [n_c, ...] over all trained
        pairs (but those of the chunk positions in `skip`, which `_put` fills later)."""
        setattr(self, name, None)
        for idx, t, rows, sig, x, u, cond in self._each_trained(b, skip):
            self._put(b, name, idx, t, fn(idx, t, rows, sig, x, u, cond))
        return getattr(self, name)

    def _put(self, b, name: str, idx: torch.Tensor, t: int, val: torch.Tensor) -> None:
        """table `name`[idx, t] = val [n_c, ...], the [M, T, ...] table made on the first value."""
        table = getattr(self, name)
        if table is None:
            table = torch.zeros((b.train.shape[0], b.train.shape[1], *val.shape[1:]), dtype=val.dtype,
                                device=val.device)
            setattr(self, name, table)
        table[idx, t] = val
