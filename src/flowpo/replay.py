"""The replay part (OP-GRPO, arXiv 2604.04142): which past trajectories join this iteration's
groups, and with what reward. `replay.k = 0` is `NoReplay`.

The trainer calls, in order, on every rank:
    fresh_counts(it, heads, G)  → [B] fresh rows per group (counts the prompts' visits first)
    extend(it, rows)            → the global rows (a flowpo.trajectory.Trajectory, all ranks'
                                  fresh rows) with the replayed rows appended, chosen as a plain
                                  function of them (every rank chooses the same); truncated tails
                                  regenerated once (`replay.tail`), each rank its share
    observe(it, fresh)          after the update: expire old entries, offer the fresh rows

Replayed rows enter with their behaviour log-probs, `old_known` False and the run's importance
weight rule (`WeightRule`, plain data): their π_old is the objective's to compute (at the
iteration's starting weights) and the rule's to turn into weights (objectives/clipped.py); an
objective without likelihood leaves their weight at 1. Nothing here calls the objective.

The buffer's data structure is in `flowpo.buffer`, the weight formulas in `flowpo.importance`.
"""
from __future__ import annotations

import torch

from flowpo.buffer import ADMISSION, ReplayBuffer, prompt_key, replayed_rows
from flowpo.groups import SPREAD_TOL, first_rows, flat_groups, group_stats
from flowpo.importance import WeightRule
from flowpo.lockstep import agreed_values
from flowpo.policy.edit import encode_rows
from flowpo.trajectory import Trajectory, cat


class NoReplay:
    """replay.k = 0: groups are G fresh samples."""

    k = 0

    def fresh_counts(self, it: int, heads, G: int) -> torch.Tensor:
        return torch.full((len(heads),), G, dtype=torch.long)

    def extend(self, it: int, rows: Trajectory) -> tuple[Trajectory, dict, int]:
        return rows, {}, 0

    def observe(self, it: int, fresh: Trajectory) -> dict:
        return {}

    def state_dict(self):
        return None

    def load_state_dict(self, tensors, meta) -> None:
        pass


class OPReplay:
    """replay.k ≥ 1: each group is G − k fresh samples plus up to k replayed ones. Every option is
    resolved here, once (the stored rows' eligibility, the tail, the fill rule, the weight rule)."""

    def __init__(self, cfg, sigmas: torch.Tensor, policy, rewards, dist, device):
        from flowpo.plans import truncation_keep

        r = cfg.replay
        self.sigmas, self.policy, self.rewards, self.dist, self.device = sigmas, policy, rewards, dist, device
        self.k, self.admit = r.k, ADMISSION[r.rule]
        self.guidance, self.batch_size = cfg.sample.guidance, cfg.sample.batch_size
        self.fill_all_misses = r.fill == "on_hit"          # a group whose prompt has no entry: G fresh
        self.store_above_mean = r.store == "above_mean"    # only rows above their group's mean are stored
        self.regenerate = r.tail == "regenerate"           # truncated tails re-run with the current policy
        cut = {"sigma": (r.truncate_at, None), "fraction": (None, r.truncate_at)}.get(r.truncate)
        self.buffer = ReplayBuffer(sigmas, capacity_per_prompt=r.capacity_per_prompt, max_age=r.max_age,
                                   decay=r.decay, age_unit=r.age_unit,
                                   truncation=None if cut is None else truncation_keep(sigmas, *cut))
        dims = 1
        for d in getattr(policy, "latent_shape", ()) or ():
            dims *= int(d)
        full = r.is_density == "sum"
        self.weight_rule = WeightRule(correction=r.is_correction, form=r.is_form, cap=r.is_cap,
                                      scale=dims if full and cfg.sample.reduction == "mean" else 1,
                                      clip=r.is_sum_clip if full else None)

    def fresh_counts(self, it: int, heads, G: int) -> torch.Tensor:
        """Fresh samples of each of the iteration's groups (`heads`: a PromptSet, one prompt per
        group): G − k, or with replay.fill=on_hit G where the prompt has no entry. Counts the
        prompts' visits first (replay.age_unit=visits ages and expires entries by them)."""
        self.buffer.visit(self._keys(heads.texts, heads.meta))
        if not self.fill_all_misses:
            return torch.full((len(heads),), G - self.k, dtype=torch.long)
        return torch.tensor([G - self.k if h else G for h in self._hits(heads.texts, heads.meta)], dtype=torch.long)

    @staticmethod
    def _keys(prompts: list[str], meta: list[dict]) -> list[str]:
        return [prompt_key(p, meta[i] if meta else None) for i, p in enumerate(prompts)]

    def _hits(self, prompts: list[str], meta: list[dict]) -> list[bool]:
        return [bool(self.buffer.entries.get(k)) for k in self._keys(prompts, meta)]

    # ------------------------------------------------------------------ before the advantages
    def extend(self, it: int, rows: Trajectory) -> tuple[Trajectory, dict, int]:
        """The global fresh `rows` with the chosen replayed rows appended (global row ids N + j)."""
        comb = self.rewards.combine(rows.raw)
        chosen = self.buffer.select(it, rows.prompts, rows.group_ids, comb, k=self.k, rule=self.admit,
                                    metadata=rows.metadata)
        firsts = first_rows(rows.group_ids)[1].tolist()                           # one row per group
        hits = self._hits([rows.prompts[i] for i in firsts], [rows.metadata[i] for i in firsts])
        stats: dict = {"replay/admitted": len(chosen), "replay/hit_rate": sum(hits) / max(1, len(hits))}
        if not chosen:
            return rows, {**stats, "replay/rescued_groups": 0.0}, 0
        T, R = rows.train.shape[1], len(chosen)
        rep = replayed_rows([e for _, e in chosen], T)
        nfe = 0
        if self.regenerate:
            rep, nfe = self._regenerate(rep)
            stats["replay/regenerate_nfe"] = float(self.dist.all_reduce_sum(torch.tensor([float(nfe)])))
        rep = rep.replace(group_ids=torch.tensor([g for g, _ in chosen]), row_ids=rows.n + torch.arange(R),
                          old_log_probs=torch.zeros(R, T), old_known=torch.zeros(R, T, dtype=torch.bool),
                          weights=torch.ones(R, T), rule=self.weight_rule)
        stats["replay/rescued_groups"] = _rescued(comb, rows.group_ids, self.rewards.combine(rep.raw), rep.group_ids)
        stats["replay/age_mean"] = float((it - rep.versions).float().mean())
        return cat([rows, rep]), stats, nfe

    def _share(self, R: int) -> slice:
        W, rank = self.dist.world, self.dist.rank
        return slice(rank * R // W, (rank + 1) * R // W)

    def _regenerate(self, rep: Trajectory) -> tuple[Trajectory, int]:
        """replay.tail=regenerate: rank r regenerates its contiguous share of the tails and all
        ranks exchange the results (new raw rewards and final latents)."""
        mine = self._share(rep.n)
        raw, final, nfe = regenerate_tails(self.policy, rep, mine, self.sigmas, guidance=self.guidance,
                                           batch_size=self.batch_size, score=self.rewards.score, device=self.device)
        parts = self.dist.all_gather_objects((raw, final))
        raw_all = torch.cat([p[0] for p in parts if p[0] is not None])
        fin_all = torch.cat([p[1] for p in parts if p[1] is not None])
        return rep.replace(raw=raw_all, final=fin_all), nfe

    # ------------------------------------------------------------------ after the update
    def observe(self, it: int, fresh: Trajectory) -> dict:
        """Expire, then offer all N global fresh rows in global order (every rank holds the same buffer)."""
        self.buffer.expire(it + 1)
        comb = self.rewards.combine(fresh.raw)
        eligible = None
        if self.store_above_mean:
            mean, _ = group_stats(comb, fresh.group_ids)
            eligible = comb > mean + SPREAD_TOL
        self.buffer.add(fresh, comb, eligible=eligible)
        return {"replay/entries": len(self.buffer), "replay/bytes": self.buffer.nbytes,
                "replay/bytes_per_trajectory": self.buffer.nbytes / max(1, len(self.buffer))}

    def state_dict(self):
        return self.buffer.state_dict()

    def load_state_dict(self, tensors, meta) -> None:
        self.buffer.load_state_dict(tensors, meta)


def _rescued(comb: torch.Tensor, groups: torch.Tensor, rep_comb: torch.Tensor, rep_groups: torch.Tensor) -> float:
    """Groups whose fresh rewards are all equal (no GRPO signal) that a replayed row gives a
    different reward, hence a signal: the groups replay rescues this iteration."""
    flat = flat_groups(comb, groups)
    n = 0
    for r, g in zip(rep_comb.tolist(), rep_groups.tolist()):
        rows = torch.nonzero(groups == g).flatten()
        n += int(len(rows) > 0 and bool(flat[rows[0]]) and abs(r - float(comb[rows[0]])) > SPREAD_TOL)
    return float(n)


@torch.no_grad()
def regenerate_tails(policy, rep: Trajectory, mine: slice, sigmas: torch.Tensor, *, guidance: float,
                     batch_size: int, score, device: torch.device | str = "cpu"):
    """`replay.tail=regenerate`: finish each replayed trajectory of the share `mine` from the state
    after its last kept step with the current policy (Euler ODE on the training grid) and score the
    new end point. Returns (raw rewards [R_mine, K], final latents [R_mine, *D] on the CPU, model
    evaluations); (None, None, 0) for an empty share. Rows that were not truncated keep their stored
    rewards and final latent. The stored trajectory is unchanged: only this iteration's advantage
    uses the regenerated reward. A rank without a share under lock-step still runs every tail's calls."""
    from flowpo.rollout import ode_sample

    T = sigmas.numel() - 1
    ids = list(range(rep.n))[mine]
    starts = [int(torch.nonzero(rep.train[i]).max()) + 1 for i in ids]            # after the last kept step
    raw = rep.raw[mine].clone()                                                       # [R_mine, K]
    final = rep.final[mine].clone()                                                   # [R_mine, *D]
    nfe = 0
    for c in agreed_values(policy, starts):  # the starts of every rank's tails under lock-step
        if c >= T:
            continue
        idx = [j for j, s in enumerate(starts) if s == c]
        x = rep.states[[ids[j] for j in idx], c].to(device)                           # x_c [n, *D]
        prompts = [rep.prompts[ids[j]] for j in idx]
        metas = [rep.metadata[ids[j]] for j in idx]
        x0, n_evals = ode_sample(policy, encode_rows(policy, prompts, metas), sigmas[c:], x, guidance, batch_size)
        if not idx:
            continue
        nfe += n_evals
        raw[idx] = score(policy.decode(x0), prompts, metas).to(raw.dtype)
        final[idx] = x0.detach().cpu()
    return (raw, final, nfe) if ids else (None, None, 0)


def build_replay(cfg, sigmas, policy, rewards, dist, device):
    """NoReplay for replay.k = 0, else OPReplay."""
    return OPReplay(cfg, sigmas, policy, rewards, dist, device) if cfg.replay.k > 0 else NoReplay()
