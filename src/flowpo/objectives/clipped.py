"""`clipped_surrogate`: Flow-GRPO's clipped ratio on the stored SDE transitions (arXiv 2505.05470).

Per trained transition (row i, step t), Eq. 5–6 of Flow-GRPO:

    ρ_{i,t} = exp(log π_θ(x_{t+1}|x_t) − log π_old(x_{t+1}|x_t))
    ℓ_{i,t} = −w_{i,t} · min(ρ·A_{i,t}, clip(ρ, 1−ε, 1+ε)·A_{i,t}) + β·KL_{i,t}

w is OP-GRPO's detached importance weight of a replayed row (arXiv 2604.04142; 1 for fresh rows),
A the group or stepwise advantage, KL the Gaussian KL of the step means to the reference policy
(adapter disabled, or the frozen copy in full fine-tuning) — `flowpo.loss.mean_kl`. π_θ is
re-scored on the same chunk of rows as the rollout used, so on policy the first ratio is exactly 1.
The reference's step means are computed once per (chunk, step) and iteration and reused by the
later passes of train.inner_epochs (`flowpo.objectives.reference`).
"""
from __future__ import annotations

import contextlib

import torch

from flowpo.loss import clipped_surrogate, mean_kl, merge_stats
from flowpo.objectives.reference import reference_cache
from flowpo.policy.base import select_cond
from flowpo.training.distributed import agreed_steps


class ClippedSurrogate:
    """objective.kind=clipped_surrogate; options under `loss.*` (clip_range, kl_beta, kl_form)."""

    def __init__(self, ctx, cfg):
        self.ctx, self.loss = ctx, cfg.loss
        self.refs = reference_cache(cfg)  # the KL's reference step means, kept across inner epochs

    # ------------------------------------------------------------------ protocol
    def sampling(self):
        return contextlib.nullcontext()

    def rescore(self, states: torch.Tensor, idx: torch.Tensor, t: int, cond: dict):
        """Score the stored transitions x_t → x_{t+1} of rows `idx` under the current velocity."""
        c = self.ctx
        sig, sig_next = float(c.sigmas[t]), float(c.sigmas[t + 1])
        x = states[idx, t]
        v = c.policy.velocity(x, torch.full((len(idx),), sig, device=x.device), cond, c.guidance)
        return c.kernel(x, v, sig, sig_next, c.noise_level, sample=states[idx, t + 1], reduction=c.reduction)

    @torch.no_grad()
    def old_log_probs(self, states, train, cond, chunks) -> torch.Tensor:
        """π_old log-probs of stored transitions under the current weights, chunk by chunk: [R, T],
        0 outside `chunks` (the replayed chunks whose π_old the update's first forward gives)."""
        out = torch.zeros(train.shape, device=states.device)
        for idx in chunks:
            for t in agreed_steps(self.ctx.policy, train[idx].any(0)):
                st = self.rescore(states, idx, t, select_cond(cond, idx))
                out[idx, t] = torch.where(train[idx, t], st.log_prob, torch.zeros_like(st.log_prob))
        return out

    def begin(self, batch, iteration: int, first=()) -> None:
        self.refs.clear()

    def chunk_loss(self, b, idx: torch.Tensor, count: float) -> list:
        """Backward the loss of every trained step of one chunk. loss.forward_rows='chunk' runs the
        forward on the whole chunk (the same rows as the rollout call), so π_θ is bit-identical to
        the rollout's on policy; 'trained' runs it on the rows that train step t only (a plan with
        per-row steps, DanceGRPO's, then pays for what it trains; the first ratio is 1 up to the
        batch-size dependence of the matmul kernels, |ρ − 1| < 1e-5 measured on the CPU)."""
        lc, c = self.loss, self.ctx
        cond = select_cond(b.cond, idx)
        out = []
        # replay.hold_graphs: replayed rows whose sequence weight needs π_old at all their steps, which
        # this chunk's own forwards give; the step losses are kept and backwarded once it is known
        held = [] if b.pending is not None and b.pending.holds(idx) else None
        for t in agreed_steps(self.ctx.policy, b.train[idx].any(0)):
            rows = b.train[idx, t]                                               # [n_c]
            if lc.forward_rows == "trained" and not bool(rows.all()):
                ids = idx[rows.cpu()]
                ids_cond, rows = select_cond(b.cond, ids), torch.ones(len(ids), dtype=torch.bool, device=rows.device)
            else:
                ids, ids_cond = idx, cond
            st = self.rescore(b.states, ids, t, ids_cond)
            if b.pending is not None:  # replayed rows of the first minibatch: π_old is this forward's
                b.pending.take(b, ids, t, st.log_prob)
            kl = None
            if lc.kl_beta > 0:
                ref_mean = self.refs.get(idx, t, lambda: self._reference_mean(b.states, ids, t, ids_cond))
                dt = float(c.sigmas[t + 1]) - float(c.sigmas[t])
                kl = mean_kl(st.mean, ref_mean, st.std, dt, lc.kl_form)[rows]
            step = (st.log_prob[rows], ids, t, rows, kl)
            if held is not None:
                held.append(step)
                continue
            loss, stat = self._surrogate(b, *step, count)
            loss.backward()
            out.append(stat)
        if held:
            b.pending.finish(b, idx)
            losses = [self._surrogate(b, *step, count) for step in held]
            sum(loss for loss, _ in losses).backward()
            out += [stat for _, stat in losses]
        return out

    def _surrogate(self, b, log_prob, ids, t: int, rows, kl, count: float):
        """The clipped loss (and its stats) of rows `ids`[rows] at step t from their log π_θ."""
        lc = self.loss
        return clipped_surrogate(log_prob, b.old_log_prob[ids, t][rows], b.adv[ids, t][rows], lc.clip_range,
                                 weights=b.weight[ids, t][rows], kl=kl, kl_beta=lc.kl_beta, normalizer=count)

    def _reference_mean(self, states: torch.Tensor, ids: torch.Tensor, t: int, cond: dict) -> torch.Tensor:
        """The reference policy's step means at x_t of rows `ids` (no grad, adapter disabled)."""
        with torch.no_grad(), self.ctx.policy.disable_adapter():
            return self.rescore(states, ids, t, cond).mean

    def merge(self, stats: list) -> dict:
        return merge_stats(stats)

    def end(self, iteration: int) -> None:
        self.refs.clear()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        pass
