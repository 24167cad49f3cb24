"""The replay part (OP-GRPO, arXiv 2604.04142): which past trajectories join this iteration's
groups, with what reward, and with what importance weight. `replay.k = 0` is `NoReplay`.

The trainer calls, in order, on every rank:
    select(it, gb)            → rep: [(group id, Entry)] chosen on the *global* batch (a plain
                                function of it: every rank chooses the same), tails finished
                                (`replay.tail`): regenerated once, each rank its share, and shared
    reward_rows(rep)          → ReplayRows for the advantage estimator (None when rep is empty)
    extend(batch, rep, adv_all, it, objective) → this rank's share of the replayed rows appended
                                to its update batch, with the objective's π_old and the IS weights
                                (or pending: see below)
    observe(it, gb)           after the update: expire old entries, offer the fresh rows

π_old of a replayed row is its log-prob under the iteration's starting weights θ. A replayed chunk
that the update trains in its first minibatch (before any optimizer step) is scored at exactly
those weights and states by the update's first forward, so its π_old is taken from there
(`PendingPiOld`, no pass of its own) whenever its weight follows from that step alone: the
per-step forms (replay.is_correction none or per_step; the sequence forms need all of a row's
steps before the row's first step trains, so they join only with replay.hold_graphs, where the
objective keeps the chunk's step graphs until its weights are known: `PendingPiOld.sequence`) and
loss.forward_rows=chunk (the pass's own rows, so the numbers are bit-identical). Every other
replayed chunk gets `objective.old_log_probs` up front.

The buffer's data structure and the weight formulas are in `flowpo.buffer`.
"""
from __future__ import annotations

import dataclasses

import torch

from flowpo.batch import GlobalBatch, ReplayRows, UpdateBatch, minibatch_of
from flowpo.buffer import STEP_LOCAL, ReplayBuffer, importance_weights, prompt_key, regenerate_tails, step_weights
from flowpo.policy.base import cat_cond


class PendingPiOld:
    """The replayed (row, step) pairs of an update batch whose π_old the update's first forward
    gives (module docstring): the objective's chunk_loss hands each step's log π_θ to `take`, which
    writes π_old and the per-step importance weight of those pairs into the batch; `stats` gives the
    weight stats of all this rank's replayed rows once they are known (after the update), the same
    values `importance_weights` gives on a table computed up front."""

    def __init__(self, mask: torch.Tensor, beta: torch.Tensor, start: int, options: dict):
        self.mask = mask          # [M, T] bool: pairs still to take
        self.beta = beta          # [R_mine, T] behaviour log-probs of the replayed rows (batch rows start…)
        self.start = start        # first replayed row of the batch
        self.options = options    # importance_weights' keywords (correction, form, cap, scale, clip)
        # a sequence weight needs all of a row's steps: the objective holds the chunk's step losses
        # until `finish` (replay.hold_graphs)
        self.sequence = options["correction"] not in STEP_LOCAL

    def holds(self, ids: torch.Tensor) -> bool:
        """Whether rows `ids` have pairs whose sequence weight is still to come (the objective must
        then keep their step graphs until `finish`)."""
        return self.sequence and bool(self.mask[ids].any())

    def take(self, b: UpdateBatch, ids: torch.Tensor, t: int, log_prob: torch.Tensor) -> None:
        """log_prob [n] of rows `ids` at step t, from the update's forward before any optimizer step:
        π_old of the pending pairs among them, and (per-step forms) their weight."""
        need = self.mask[ids, t]
        if not bool(need.any()):
            return
        b.old_log_prob[ids, t] = torch.where(need, log_prob.detach().to(b.old_log_prob.dtype), b.old_log_prob[ids, t])
        self.mask[ids, t] = False
        if self.sequence:
            return
        o = self.options
        w, _ = step_weights(b.old_log_prob[ids, t], self.beta[ids - self.start, t], need, correction=o["correction"],
                            cap=o["cap"], scale=o["scale"], clip=o["clip"])
        b.weight[ids, t] = torch.where(need, w, b.weight[ids, t])

    def finish(self, b: UpdateBatch, ids: torch.Tensor) -> None:
        """Sequence forms: after every step of the chunk `ids` has been taken, the rows' weights
        (each row's from its own kept steps, as `importance_weights` computes them up front)."""
        if not self.sequence:
            return
        if bool(self.mask[ids].any()):
            raise RuntimeError("a replayed row's sequence weight was asked for before all its steps had run")
        rep = ids[ids >= self.start]
        if len(rep):
            w, _ = importance_weights(b.old_log_prob[rep], self.beta[rep - self.start], b.train[rep], **self.options)
            b.weight[rep] = w.to(b.weight.dtype)

    def left(self) -> int:
        """Pairs not taken yet (0 once the first minibatch has run)."""
        return int(self.mask.sum())

    def stats(self, b: UpdateBatch) -> dict:
        """The importance-weight stats (`replay/w_mean`, …) of this rank's replayed rows."""
        if self.left():
            raise RuntimeError(f"{self.left()} replayed (row, step) pairs got no π_old: their chunks did not "
                               "run in the update's first minibatch")
        r = slice(self.start, b.old_log_prob.shape[0])
        return importance_weights(b.old_log_prob[r], self.beta, b.train[r], **self.options)[1]


class NoReplay:
    """replay.k = 0: groups are G fresh samples."""

    k = 0

    def fresh_counts(self, it: int, prompts: list[str], G: int, metadata: list[dict] | None = None) -> torch.Tensor:
        return torch.full((len(prompts),), G, dtype=torch.long)

    def select(self, it: int, gb: GlobalBatch) -> tuple[list, dict, int]:
        return [], {}, 0

    def reward_rows(self, rep: list) -> None:
        return None

    def extend(self, batch: UpdateBatch, rep: list, adv_all: torch.Tensor, it: int, objective) -> tuple[UpdateBatch, dict]:
        return batch, {}

    def observe(self, it: int, gb: GlobalBatch) -> dict:
        return {}

    def state_dict(self):
        return None

    def load_state_dict(self, tensors, meta) -> None:
        pass


class OPReplay:
    """replay.k ≥ 1: each group is G − k fresh samples plus up to k replayed ones."""

    def __init__(self, cfg, sigmas: torch.Tensor, policy, rewards, dist, device):
        r = cfg.replay
        self.cfg, self.r, self.sigmas, self.policy, self.rewards, self.dist, self.device = \
            cfg, r, sigmas, policy, rewards, dist, device
        self.k = r.k
        self.lazy_pi_old = True  # False: every replayed chunk gets its own π_old pass (tests compare the two)
        self.buffer = ReplayBuffer(sigmas, capacity_per_prompt=r.capacity_per_prompt, max_age=r.max_age,
                                   decay=r.decay, truncate_sigma=r.truncate_sigma,
                                   truncate_fraction=r.truncate_fraction, age_unit=r.age_unit)

    def fresh_counts(self, it: int, prompts: list[str], G: int, metadata: list[dict] | None = None) -> torch.Tensor:
        """Fresh samples of each of the iteration's groups (`prompts`: one per group): G − k, or
        with replay.fill=on_hit G where the prompt has no entry. Counts the prompts' visits first
        (replay.age_unit=visits ages and expires entries by them)."""
        keys = [prompt_key(p, metadata[i] if metadata else None) for i, p in enumerate(prompts)]
        self.buffer.visit(keys)
        self._hits = [bool(self.buffer.entries.get(k)) for k in keys]
        if self.r.fill == "fixed":
            return torch.full((len(prompts),), G - self.k, dtype=torch.long)
        return torch.tensor([G - self.k if h else G for h in self._hits], dtype=torch.long)

    # ------------------------------------------------------------------ before the advantages
    def select(self, it: int, gb: GlobalBatch) -> tuple[list, dict, int]:
        """Choose on the global batch; regenerate truncated tails (replay.tail=regenerate) once:
        rank r regenerates its contiguous share and all ranks exchange the results."""
        rep = self.buffer.select(it, gb.prompts, gb.group_ids, gb.raw @ self.rewards.weights, k=self.k,
                                 rule=self.r.rule, metadata=gb.metadata)
        hits = getattr(self, "_hits", [])
        stats: dict = {"replay/admitted": len(rep), "replay/hit_rate": sum(hits) / max(1, len(hits))}
        nfe = 0
        if rep and self.r.tail == "regenerate":
            mine = slice(*self._share(len(rep)))
            entries = [e for _, e in rep[mine]]
            raw, final, nfe = (regenerate_tails(self.policy, entries, self.sigmas, guidance=self.cfg.sample.guidance,
                                                batch_size=self.cfg.sample.batch_size, score=self.rewards.score,
                                                device=self.device)
                               if entries or getattr(self.dist, "lockstep", False) else (None, None, 0))
            parts = self.dist.all_gather_objects((raw, None if final is None else final.cpu()))
            raw_all = torch.cat([p[0] for p in parts if p[0] is not None])
            fin_all = torch.cat([p[1] for p in parts if p[1] is not None])
            rep = [(g, dataclasses.replace(e, reward_raw=raw_all[i], final=fin_all[i])) for i, (g, e) in enumerate(rep)]
            stats["replay/regenerate_nfe"] = float(self.dist.all_reduce_sum(torch.tensor([float(nfe)])))
        stats["replay/rescued_groups"] = self._rescued(gb, rep)
        return rep, stats, nfe

    def _rescued(self, gb: GlobalBatch, rep: list) -> float:
        """Groups whose fresh rewards are all equal (no GRPO signal) that the replayed row gives a
        different reward, hence a signal: the groups replay rescues this iteration."""
        comb = gb.raw @ self.rewards.weights
        n = 0
        for g, e in rep:
            fresh = comb[gb.group_ids == g]
            r = float(e.reward_raw.float() @ self.rewards.weights)
            n += int(fresh.numel() > 0 and float(fresh.std(unbiased=False)) < 1e-6 and abs(r - float(fresh[0])) > 1e-6)
        return float(n)

    def _share(self, R: int) -> tuple[int, int]:
        W, rank = self.dist.world, self.dist.rank
        return rank * R // W, (rank + 1) * R // W

    def reward_rows(self, rep: list) -> ReplayRows | None:
        if not rep:
            return None
        T = self.sigmas.numel() - 1
        K = len(self.rewards.names)
        return ReplayRows(raw=torch.stack([e.reward_raw for _, e in rep]),
                          group_ids=torch.tensor([g for g, _ in rep]),
                          valid=torch.stack([self._row_mask(e, T) for _, e in rep]),
                          step_rewards=torch.stack([e.step_rewards if e.step_rewards is not None
                                                    else torch.zeros(T + 1, K) for _, e in rep]))

    @staticmethod
    def _row_mask(e, T: int) -> torch.Tensor:
        m = torch.zeros(T, dtype=torch.bool)
        m[e.steps] = True
        return m

    # ------------------------------------------------------------------ the update batch
    def extend(self, b: UpdateBatch, rep: list, adv_all: torch.Tensor, it: int, objective) -> tuple[UpdateBatch, dict]:
        """Append this rank's share of the replayed rows: global chunks of their own, after the fresh
        ones; rank r holds rows [r·R/W, (r+1)·R/W). π_old at the current weights: computed here, or
        left to the update's first forward (the returned batch's `pending`; the weight stats come
        from `PendingPiOld.stats` after the update then)."""
        from flowpo.rollout import make_chunks

        R = len(rep)
        if R == 0:
            return b, {}
        n_global = adv_all.shape[0] - R
        lo, hi = self._share(R)
        mine = [(j, g, e) for j, (g, e) in enumerate(rep)][lo:hi]
        g_rchunks = make_chunks(R, self.cfg.sample.batch_size, None)
        lockstep = getattr(self.dist, "lockstep", False)  # FSDP2 sharded: empty parts stay (distributed.py)
        r_chunks, r_ids = (self.dist.local_chunks(g_rchunks, slice(lo, hi), keep_empty=True) if lockstep
                           else self.dist.local_chunks(g_rchunks, slice(lo, hi)))
        chunk_ids = b.chunk_ids + [b.n_chunks + i for i in r_ids]
        n_chunks = b.n_chunks + len(g_rchunks)
        T = b.train.shape[1]
        dev = b.states.device
        n = b.states.shape[0]
        # the replayed chunks whose π_old the update's first forward gives (module docstring); the
        # choice is made on global chunk ids, so every rank makes the same π_old calls for the rest
        # (hold_graphs changes how many backward calls a chunk makes, which FSDP2's lock-stepped ranks
        # must agree on whatever rows they hold: it applies to unsharded runs only)
        lazy = (self.lazy_pi_old and (self.r.is_correction in STEP_LOCAL or (self.r.hold_graphs and not lockstep))
                and self.cfg.loss.forward_rows == "chunk")
        first = [lazy and minibatch_of(b.n_chunks + i, n_chunks, self.cfg.train.minibatches) == 0 for i in r_ids]
        upfront = [c for c, f in zip(r_chunks, first) if not f]
        if not mine:  # (under lock-step the empty chunks stay, and π_old's calls are still made)
            if lockstep:
                objective.old_log_probs(torch.zeros((0, T + 1, *b.states.shape[2:]), device=dev),
                                        torch.zeros((0, T), dtype=torch.bool, device=dev),
                                        self.policy.encode_prompts([]), upfront)
            return dataclasses.replace(b, chunks=b.chunks + [c + n for c in r_chunks], chunk_ids=chunk_ids,
                                       n_chunks=n_chunks), {}
        r_states = torch.zeros((len(mine), T + 1, *b.states.shape[2:]), device=dev)
        r_train = torch.zeros((len(mine), T), dtype=torch.bool, device=dev)
        beta = torch.zeros((len(mine), T), device=dev)
        for m, (_, _, e) in enumerate(mine):  # entries live on the CPU (buffer.py)
            steps = e.steps.to(dev)
            r_states[m, steps], r_states[m, steps + 1] = e.x.to(dev), e.x_next.to(dev)
            r_train[m, steps] = True
            beta[m, steps] = e.log_prob.to(dev)
        r_final = torch.stack([e.final if e.final is not None else torch.zeros(b.final.shape[1:]) for _, _, e in mine]).to(dev)
        r_cond = self.policy.encode_prompts([e.prompt for _, _, e in mine])
        pi_old = objective.old_log_probs(r_states, r_train, r_cond, upfront)               # [R_mine, T] or None
        stats: dict = {"replay/age_mean": sum(it - e.version for _, _, e in mine) / len(mine)}
        pending = None
        if pi_old is None:  # an objective without likelihood: replayed rows enter with weight 1
            pi_old, r_weight = torch.zeros_like(beta), torch.ones_like(beta)
        else:
            dims = 1
            for d in b.states.shape[2:]:
                dims *= int(d)
            scale = dims if (self.r.is_density == "sum" and self.cfg.sample.reduction == "mean") else 1
            options = dict(correction=self.r.is_correction, form=self.r.is_form, cap=self.r.is_cap, scale=scale,
                           clip=self.r.is_sum_clip if self.r.is_density == "sum" else None)
            taken = torch.zeros_like(r_train)
            for c, f in zip(r_chunks, first):
                if f:
                    taken[c] = r_train[c]
            if bool(taken.any()):  # their π_old and weight come with the update's first forward
                r_weight, _ = importance_weights(pi_old, beta, r_train, **options)  # (right where not taken)
                pending = PendingPiOld(torch.cat([torch.zeros_like(b.train, device=dev), taken]), beta, n, options)
            else:
                r_weight, wstats = importance_weights(pi_old, beta, r_train, **options)
                stats.update(wstats)
        rows = torch.tensor([j for j, _, _ in mine])
        return UpdateBatch(
            states=torch.cat([b.states, r_states]), final=torch.cat([b.final, r_final]),
            train=torch.cat([b.train, r_train.to(b.train.device)]), old_log_prob=torch.cat([b.old_log_prob, pi_old.to(dev)]),
            adv=torch.cat([b.adv, adv_all[n_global + rows].to(dev)]), weight=torch.cat([b.weight, r_weight.to(dev)]),
            cond=cat_cond([b.cond, r_cond]), chunks=b.chunks + [c + n for c in r_chunks], chunk_ids=chunk_ids,
            n_chunks=n_chunks, row_ids=torch.cat([b.row_ids, n_global + rows]), pending=pending), stats

    # ------------------------------------------------------------------ after the update
    def observe(self, it: int, gb: GlobalBatch) -> dict:
        """Expire, then offer all N global rows in global order (every rank holds the same buffer)."""
        self.buffer.expire(it + 1)
        comb = gb.raw @ self.rewards.weights
        eligible = None
        if self.r.store == "above_mean":
            ids, inv = torch.unique(gb.group_ids, return_inverse=True)
            mean = torch.zeros(len(ids)).index_add_(0, inv, comb) / torch.bincount(inv, minlength=len(ids))
            eligible = comb > mean[inv] + 1e-6
        self.buffer.add(it, gb.prompts, gb.states, gb.train, gb.log_probs, comb, gb.raw,
                        gb.step_rewards, finals=gb.final, metadata=gb.metadata, eligible=eligible)
        return {"replay/entries": len(self.buffer), "replay/bytes": self.buffer.nbytes,
                "replay/bytes_per_trajectory": self.buffer.nbytes / max(1, len(self.buffer))}

    def state_dict(self):
        return self.buffer.state_dict()

    def load_state_dict(self, tensors, meta) -> None:
        self.buffer.load_state_dict(tensors, meta)


def build_replay(cfg, sigmas, policy, rewards, dist, device):
    """NoReplay for replay.k = 0, else OPReplay."""
    return OPReplay(cfg, sigmas, policy, rewards, dist, device) if cfg.replay.k > 0 else NoReplay()
