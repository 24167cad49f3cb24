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

π_old is this objective's. Fresh rows know it (the rollout's log-probs, `old_known`); replayed rows
arrive with their behaviour log-probs β and the run's weight rule (flowpo.importance.WeightRule),
and π_old is their log-prob under the iteration's starting weights θ. A replayed chunk that trains
in the first minibatch (before any optimizer step) is scored at exactly θ by the update's own
forward, so its π_old is taken from there, with no pass of its own, whenever its weight follows
from that step alone: the per-step rules, or the sequence rules with replay.hold_graphs (the
chunk's step graphs are kept until all its steps are known, then one backward; not under
lock-step, whose ranks must make the same backward calls), and loss.forward_rows=chunk (the
pass's own rows, so the numbers are bit-identical). Every other replayed chunk gets a pass in
`begin`.
"""
from __future__ import annotations

import contextlib

import torch

from flowpo.lockstep import agreed_steps, is_lockstep
from flowpo.trajectory import trained_steps
from flowpo.loss import LossStats, clipped_surrogate, mean_kl
from flowpo.objectives.reference import reference_cache
from flowpo.policy.base import select_cond


class ClippedSurrogate:
    """objective.kind=clipped_surrogate; options under `loss.*` (clip_range, kl_beta, kl_form)."""

    Stats = LossStats
    rescores_rollout = True  # re-scores the rollout's own states: may take its CFG outputs (flowpo.guided)

    def __init__(self, ctx, cfg):
        self.ctx, self.loss = ctx, cfg.loss
        self.refs = reference_cache(cfg)  # the KL's reference step means, kept across inner epochs
        self.sig = ctx.sigmas.tolist()    # [T+1] as floats, read once (no conversion per step)
        self.from_forward = cfg.loss.forward_rows == "chunk"
        self.hold_graphs = cfg.replay.hold_graphs and not is_lockstep(ctx.policy)
        self.b = None          # the iteration's update rows
        self.take = None       # [M, T] bool: pairs whose π_old the update's first forward still has to give
        self.taking = set()    # ids of the chunk tensors holding such pairs
        self.replayed = None   # [M] bool: rows whose weight the rule sets
        self.rollout_chunks = set()  # ids of the chunks the rollout sampled (their CFG outputs may be reused)

    # ------------------------------------------------------------------ protocol
    def sampling(self, iteration: int = 0):
        return contextlib.nullcontext()

    def rescore(self, states: torch.Tensor, idx: torch.Tensor, t: int, cond: dict, uncond=None):
        """Score the stored transitions x_t → x_{t+1} of rows `idx` under the current velocity.
        uncond: CFG's unconditional outputs at these states, known already (flowpo.guided)."""
        c = self.ctx
        sig, sig_next = self.sig[t], self.sig[t + 1]
        x = states[idx, t]
        v, _ = c.guided(x, torch.full((len(idx),), sig, device=x.device), cond, uncond)
        return c.kernel(x, v, sig, sig_next, c.noise_level, sample=states[idx, t + 1], reduction=c.reduction)

    def begin(self, b, iteration: int, first=()) -> None:
        """π_old of the pairs the rollout did not know (module docstring): `first` are the
        positions in b.chunks.rows of minibatch 0, whose forward may give it; a pass now for the
        rest; then the rule's weights of the replayed rows (those of taken pairs follow later)."""
        self.refs.clear()
        self.b, self.taking, rule = b, set(), b.rule
        fresh = b.chunks.rows[:b.chunks.fresh] if b.chunks.fresh is not None else b.chunks.rows
        self.rollout_chunks = {id(c) for c in fresh} if b.uncond is not None else set()
        if rule is None:  # fresh rows only: every π_old known, weights 1
            return
        unknown = b.train & ~b.old_known                                      # [M, T]
        self.replayed = unknown.any(1)                                        # [M]
        self.take = torch.zeros_like(unknown)
        if self.from_forward and (rule.step_local or self.hold_graphs):
            for j in first:
                self.take[b.chunks.rows[j]] = unknown[b.chunks.rows[j]]
        rest = unknown & ~self.take
        chunks = b.chunks.rows
        taking, needed = torch.stack([torch.stack([self.take[c].any(), rest[c].any()]) for c in chunks]).cpu().unbind(1)
        self.taking = {id(c) for c, x in zip(chunks, taking.tolist()) if x}
        with torch.no_grad():  # under lock-step every rank runs the chunks where any rank has such pairs
            for j in agreed_steps(self.ctx.policy, needed):
                idx = chunks[j]
                cond = select_cond(b.cond, idx)
                for t in trained_steps(b, idx, self.ctx.policy):
                    st = self.rescore(b.states, idx, t, cond)
                    b.old_log_probs[idx, t] = torch.where(rest[idx, t], st.log_prob, b.old_log_probs[idx, t])
        rep = self.replayed
        if bool(rep.any()):  # (a rank whose share of the replayed rows is empty has none)
            b.weights[rep] = rule.weights(b.old_log_probs[rep], b.log_probs[rep], b.train[rep])[0].to(b.weights.dtype)

    def chunk_loss(self, b, idx: torch.Tensor, count: float) -> list:
        """Backward the loss of every trained step of one chunk. loss.forward_rows='chunk' runs the
        forward on the whole chunk (the same rows as the rollout call), so π_θ is bit-identical to
        the rollout's on policy; 'trained' runs it on the rows that train step t only (a plan with
        per-row steps, DanceGRPO's, then pays for what it trains; the first ratio is 1 up to the
        batch-size dependence of the matmul kernels, |ρ − 1| < 1e-5 measured on the CPU)."""
        lc = self.loss
        cond = select_cond(b.cond, idx)
        out = []
        taking = id(idx) in self.taking
        # the rollout's v_u at these states: valid while b carries it (trainer: until the first optimizer step)
        reuse = b.uncond is not None and id(idx) in self.rollout_chunks
        # sequence weights whose π_old this chunk's forwards give: keep the step losses, backward once known
        held = [] if taking and not b.rule.step_local else None
        for t in trained_steps(b, idx, self.ctx.policy):
            rows = b.train[idx, t]                                               # [n_c]
            if lc.forward_rows == "trained" and not bool(rows.all()):
                ids = idx[rows.cpu()]
                ids_cond, rows = select_cond(b.cond, ids), torch.ones(len(ids), dtype=torch.bool, device=rows.device)
            else:
                ids, ids_cond = idx, cond
            st = self.rescore(b.states, ids, t, ids_cond, b.uncond[ids, t] if reuse else None)
            if taking:
                self._take(b, ids, t, st.log_prob)
            kl = None
            if lc.kl_beta > 0:
                ref_mean = self.refs.get(idx, t, lambda: self._reference_mean(b.states, ids, t, ids_cond))
                dt = self.sig[t + 1] - self.sig[t]
                kl = mean_kl(st.mean, ref_mean, st.std, dt, lc.kl_form)[rows]
            step = (st, ids, t, rows, kl)
            if held is not None:
                held.append(step)
                continue
            loss, stat = self._surrogate(b, *step, count)
            loss.backward()
            out.append(stat)
        if held:
            rep = idx[self.replayed[idx].cpu()]
            b.weights[rep] = b.rule.weights(b.old_log_probs[rep], b.log_probs[rep], b.train[rep])[0]
            losses = [self._surrogate(b, *step, count) for step in held]
            sum(loss for loss, _ in losses).backward()
            out += [stat for _, stat in losses]
        return out

    def _take(self, b, ids: torch.Tensor, t: int, log_prob: torch.Tensor) -> None:
        """π_old (and, for a per-step rule, the weight) of the taken pairs of rows `ids` at step t
        from this forward's log π_θ [n], at the iteration's starting weights."""
        need = self.take[ids, t]
        if not bool(need.any()):
            return
        b.old_log_probs[ids, t] = torch.where(need, log_prob.detach().to(b.old_log_probs.dtype), b.old_log_probs[ids, t])
        self.take[ids, t] = False
        if b.rule.step_local:
            w = b.rule.step(b.old_log_probs[ids, t], b.log_probs[ids, t], need)
            b.weights[ids, t] = torch.where(need, w, b.weights[ids, t])

    def _surrogate(self, b, st, ids, t: int, rows, kl, count: float):
        """The clipped loss (and its stats) of rows `ids`[rows] at step t from their step under π_θ
        (`st`, a flowpo.sde.Step of all rows `ids`; the objectives built on this one read its mean)."""
        lc = self.loss
        return clipped_surrogate(st.log_prob[rows], b.old_log_probs[ids, t][rows], b.adv[ids, t][rows], lc.clip_range,
                                 weights=b.weights[ids, t][rows], kl=kl, kl_beta=lc.kl_beta, normalizer=count)

    def _reference_mean(self, states: torch.Tensor, ids: torch.Tensor, t: int, cond: dict) -> torch.Tensor:
        """The reference policy's step means at x_t of rows `ids` (no grad, adapter disabled)."""
        with torch.no_grad(), self.ctx.policy.disable_adapter():
            return self.rescore(states, ids, t, cond).mean

    def end(self, iteration: int) -> dict:
        """The replayed rows' importance-weight stats (`replay/w_*`), now that every π_old is known."""
        b, out = self.b, {}
        self.refs.clear()
        if b is not None and b.rule is not None and bool(self.replayed.any()):
            if bool(self.take.any()):
                raise RuntimeError("replayed rows' π_old was left to a chunk that did not run before the first "
                                   "optimizer step")
            rep = self.replayed
            out = b.rule.weights(b.old_log_probs[rep], b.log_probs[rep], b.train[rep])[1]
        self.b = self.take = self.replayed = None
        self.taking, self.rollout_chunks = set(), set()
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        pass
