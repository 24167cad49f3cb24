"""OP-GRPO replay buffer (arXiv 2604.04142): keep, per prompt, the best past trajectories and mix
them into later groups.

What is stored per trajectory is only what the loss re-scores: for each kept step t the pair
(x_t, x_{t+1}), the behaviour log-prob log β(x_{t+1}|x_t), the raw rewards, and the iteration
(policy version) that generated it. Late steps (σ_t < truncate_sigma) are truncated at insertion:
their off-policy ratios are ill-conditioned (log-ratio variance grows like 1/s², docs/samplers.md).

Ranking: score = reward − decay·age; each prompt keeps its `capacity` best; entries older than
`max_age` iterations expire. The adaptive admission rule decides, per group, whether the replayed
trajectory enters (see `admit`). The paper's exact capacity/decay/adaptive rule is not public: these
are the project's choices, exposed as options (REFERENCE.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(eq=False)
class Entry:
    prompt: str
    reward: float                 # combined (weighted) reward
    reward_raw: torch.Tensor      # [K]
    steps: torch.Tensor           # [S] long: kept step indices t
    x: torch.Tensor               # [S, *D]  x_t
    x_next: torch.Tensor          # [S, *D]  x_{t+1}
    log_prob: torch.Tensor        # [S] behaviour log-probs
    version: int                  # iteration that generated it
    step_rewards: torch.Tensor | None = None  # [T+1, K] raw rewards of the estimates (stepwise credit), optional
    final: torch.Tensor | None = None         # [*D] final latent (objectives on final samples), optional
    meta: dict = field(default_factory=dict)  # the prompt's metadata (flowpo.prompts), for re-scoring
    visit: int = 0                # the prompt's visit count when it was stored (replay.age_unit=visits)

    @property
    def nbytes(self) -> int:
        ts = [self.reward_raw, self.steps, self.x, self.x_next, self.log_prob]
        ts += [t for t in (self.step_rewards, self.final) if t is not None]
        return sum(t.numel() * t.element_size() for t in ts)


def admit(rule: str, replay_reward: float, fresh_rewards: torch.Tensor, tol: float = 1e-6) -> bool:
    """Adaptive incorporation rule for one group.

    always:                  always mix the replayed trajectory in.
    beats_best:              only if it beats every fresh sample (it then carries a positive signal).
    no_spread:               only if the fresh group has (almost) no reward spread, so GRPO would
                             otherwise get zero advantages and waste the group.
    beats_best_or_no_spread: either of the two (default).
    """
    best = float(fresh_rewards.max())
    no_spread = float(fresh_rewards.std(unbiased=False)) < tol
    if rule == "always":
        return True
    if rule == "beats_best":
        return replay_reward > best
    if rule == "no_spread":
        return no_spread
    if rule == "beats_best_or_no_spread":
        return replay_reward > best or no_spread
    raise ValueError(f"replay.rule={rule!r}; allowed: always, beats_best, no_spread, beats_best_or_no_spread")


STEP_LOCAL = ("none", "per_step")
"""The replay.is_correction forms whose weight at (row i, step t) needs π_old at (i, t) only."""


def step_weights(pi_old: torch.Tensor, beta: torch.Tensor, kept: torch.Tensor, *, correction: str,
                 cap: float | None = None, scale: float = 1.0,
                 clip: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights of the per-step forms (`STEP_LOCAL`: none, per_step) → (w, bounded), both shaped
    like pi_old: w_t = π_old(t)/β(t) (1 for none) after `scale`, `clip` and `cap` as in
    `importance_weights`, and where the clip or the cap changed it. Element by element, so any
    subset of the pairs (one step of one chunk, as the update's first forward gives π_old: replay.py)
    gets the same values as the whole table."""
    d = (pi_old - beta) * kept * scale
    return _bounded(torch.ones_like(d) if correction == "none" else d.exp(), cap, clip)


def _bounded(w: torch.Tensor, cap: float | None, clip: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """w clipped to [1/clip, clip], then truncated at cap → (w, where either changed it)."""
    capped = torch.zeros_like(w, dtype=torch.bool)
    if clip is not None:
        capped = (w > clip) | (w < 1 / clip)
        w = w.clamp(1 / clip, clip)
    if cap is not None:
        capped |= w > cap
        w = w.clamp(max=cap)
    return w, capped


def importance_weights(pi_old: torch.Tensor, beta: torch.Tensor, kept: torch.Tensor, *,
                       correction: str = "sequence", form: str = "geomean",
                       cap: float | None = None, scale: float = 1.0,
                       clip: float | None = None) -> tuple[torch.Tensor, dict]:
    """OP-GRPO importance weights of replayed rows → ([R, T] detached weights, stats).

    pi_old, beta [R, T]: log-probs of the stored transitions under π_old (the iteration's starting
    weights: replay.py says where they come from) and under the behaviour policy β that generated
    them; kept [R, T] bool.
        sequence, product:  w = Π_{t∈K} π_old/β = exp(Σ_K (log π_old − log β))
        sequence, geomean:  w = exp(mean_K (log π_old − log β))
        per_step:           w_t = π_old(t)/β(t)
        none:               w = 1
    Every form is truncated at `cap`. The PPO clip stays on π_θ/π_old; w multiplies the step losses.
    `scale` multiplies the per-step log-ratios first (D, the latent size, turns mean-reduced
    log-probs into the full density: replay.is_density=sum), and `clip` then bounds w to
    [1/clip, clip]. Stats: mean, max and 10/50/90th percentiles of the sequence weight, the std of
    its log, the capped fraction of kept steps, and Kish's effective sample size (Σw)²/Σw².
    """
    if correction not in ("none", "sequence", "per_step"):
        raise ValueError(f"replay.is_correction={correction!r}; allowed: none, sequence, per_step")
    if form not in ("product", "geomean"):
        raise ValueError(f"replay.is_form={form!r}; allowed: product, geomean")
    cnt = kept.sum(1).clamp_min(1)
    if correction in STEP_LOCAL:
        w, capped = step_weights(pi_old, beta, kept, correction=correction, cap=cap, scale=scale, clip=clip)
    else:
        d = (pi_old - beta) * kept * scale                      # [R, T]
        logw = d.sum(1) if form == "product" else d.sum(1) / cnt
        w, capped = _bounded(logw.exp()[:, None].expand_as(d).clone(), cap, clip)
    seq = w[:, 0] if correction != "per_step" else (w * kept).sum(1) / cnt
    ess = float(seq.sum() ** 2 / (seq ** 2).sum().clamp_min(1e-12))
    q = torch.quantile(seq.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.double)).tolist()
    return w.detach(), {"replay/w_mean": float(seq.mean()), "replay/w_max": float(seq.max()),
                        "replay/w_p10": q[0], "replay/w_p50": q[1], "replay/w_p90": q[2],
                        "replay/logw_std": float(seq.log().std(unbiased=False)),
                        "replay/capped_frac": float((capped & kept).sum() / kept.sum().clamp_min(1)),
                        "replay/ess": ess}


@torch.no_grad()
def regenerate_tails(policy, entries: list[Entry], sigmas: torch.Tensor, *, guidance: float, batch_size: int,
                     score, device: torch.device | str = "cpu") -> tuple[torch.Tensor, int]:
    """`replay.tail=regenerate`: finish each replayed trajectory from the state after its last kept
    step with the current policy (Euler ODE on the training grid) and score the new end point.

    Returns (raw rewards [R, K] of the regenerated images, their final latents [R, *D] on the CPU,
    model evaluations). Entries that were not truncated keep their stored rewards and final latent
    (nothing to regenerate). The stored trajectory itself
    is unchanged: only this iteration's advantage uses the regenerated reward. `device`: where
    the policy runs (entries are stored on the CPU).
    """
    from flowpo.rollout import ode_sample
    from flowpo.training.distributed import agreed_values

    T = sigmas.numel() - 1
    if not entries:  # a rank with no share under lock-step (FSDP2): it still runs every tail's calls
        dims = tuple(policy.latent_shape)
        for c in agreed_values(policy, []):
            if c < T:
                ode_sample(policy, policy.encode_prompts([]), sigmas[c:], torch.zeros((0, *dims), device=device),
                           guidance, batch_size)
        return None, None, 0
    raw = torch.stack([e.reward_raw for e in entries]).clone()  # [R, K]
    dims = entries[0].x.shape[1:]
    final = torch.stack([e.final if e.final is not None else torch.zeros(dims) for e in entries])  # [R, *D]
    nfe = 0
    starts = [int(e.steps[-1]) + 1 for e in entries]
    for c in agreed_values(policy, starts):  # the starts of every rank's tails under lock-step
        if c >= T:
            continue
        idx = [i for i, s in enumerate(starts) if s == c]
        x = torch.stack([entries[i].x_next[-1] for i in idx]).to(device) if idx else \
            torch.zeros((0, *dims), device=device)  # x_c, [n, *D] on the policy's device
        cond = policy.encode_prompts([entries[i].prompt for i in idx])
        x0, n_evals = ode_sample(policy, cond, sigmas[c:], x, guidance, batch_size)
        if not idx:
            continue
        nfe += n_evals
        raw[idx] = score(policy.decode(x0), [entries[i].prompt for i in idx],
                         [entries[i].meta for i in idx]).to(raw.dtype)
        final[idx] = x0.detach().cpu()
    return raw, final, nfe


def prompt_key(prompt: str, meta: dict | None = None) -> str:
    """The buffer's key of a prompt: its text, plus its metadata when it has any (two .jsonl rows
    with the same text but other metadata, e.g. another OCR target, are different prompts)."""
    import json

    return prompt if not meta else prompt + "\x00" + json.dumps(meta, sort_keys=True, default=str)


class ReplayBuffer:
    """Best past trajectories per prompt. Age (for expiry after `max_age` and the ranking decay) is
    counted in iterations, or in the prompt's own visits (`age_unit="visits"`: the number of times
    its prompt was drawn since it was stored), so an entry of a prompt that was not drawn does not
    age."""

    def __init__(self, sigmas: torch.Tensor, *, capacity_per_prompt: int = 2, max_age: int = 8,
                 decay: float = 0.0, truncate_sigma: float | None = None, truncate_fraction: float | None = None,
                 age_unit: str = "iterations"):
        if age_unit not in ("iterations", "visits"):
            raise ValueError(f"replay.age_unit={age_unit!r}; allowed: iterations, visits")
        self.sigmas = sigmas
        self.capacity = capacity_per_prompt
        self.max_age = max_age
        self.decay = decay
        self.truncate_sigma = truncate_sigma
        self.truncate_fraction = truncate_fraction
        self.age_unit = age_unit
        self.entries: dict[str, list[Entry]] = {}
        self.visits: dict[str, int] = {}

    def visit(self, prompts: list[str]) -> None:
        """Count one visit per drawn group of each prompt key (`prompt_key`; age_unit=visits);
        expire what aged out."""
        for p in prompts:
            self.visits[p] = self.visits.get(p, 0) + 1
        if self.age_unit == "visits":
            self.expire(0)

    def age(self, e: Entry, iteration: int) -> int:
        if self.age_unit == "visits":
            return self.visits.get(prompt_key(e.prompt, e.meta), 0) - e.visit
        return iteration - e.version

    # ------------------------------------------------------------------ contents
    def kept_steps(self, train_row: torch.Tensor) -> torch.Tensor:
        """Trained steps of one row minus the truncated late ones → [S] long."""
        from flowpo.plans import truncation_keep

        keep = train_row.cpu().clone()
        if self.truncate_sigma is not None or self.truncate_fraction is not None:
            keep &= truncation_keep(self.sigmas, self.truncate_sigma, self.truncate_fraction)
        return torch.nonzero(keep).flatten()

    def add(self, iteration: int, prompts: list[str], states: torch.Tensor, train: torch.Tensor,
            log_probs: torch.Tensor, rewards: torch.Tensor, rewards_raw: torch.Tensor,
            step_rewards: torch.Tensor | None = None, finals: torch.Tensor | None = None,
            metadata: list[dict] | None = None, eligible: torch.Tensor | None = None) -> int:
        """Offer N fresh trajectories (states [N, T+1, *D], train [N, T], log_probs [N, T],
        rewards [N], rewards_raw [N, K], optional step_rewards [N, T+1, K] and final latents
        [N, *D]); returns how many were kept."""
        added = 0
        for i, p in enumerate(prompts):
            if eligible is not None and not bool(eligible[i]):
                continue
            key = prompt_key(p, metadata[i] if metadata else None)
            steps = self.kept_steps(train[i])
            if steps.numel() == 0:
                continue
            # entries live on the CPU (GPU memory is for the model); indexing with `steps` copies
            e = Entry(prompt=p, reward=float(rewards[i]), reward_raw=rewards_raw[i].detach().cpu().clone(),
                      steps=steps, x=states[i, steps.to(states.device)].detach().cpu(),
                      x_next=states[i, (steps + 1).to(states.device)].detach().cpu(),
                      log_prob=log_probs[i, steps.to(log_probs.device)].detach().cpu(), version=iteration,
                      step_rewards=None if step_rewards is None else step_rewards[i].detach().cpu().clone(),
                      final=None if finals is None else finals[i].detach().cpu().clone(),
                      meta=dict(metadata[i]) if metadata else {}, visit=self.visits.get(key, 0))
            lst = self.entries.setdefault(key, [])
            lst.append(e)
            lst.sort(key=lambda x: self._score(x, iteration), reverse=True)
            del lst[self.capacity:]
            added += int(any(x is e for x in lst))
        return added

    def _score(self, e: Entry, iteration: int) -> float:
        return e.reward - self.decay * self.age(e, iteration)

    def expire(self, iteration: int) -> int:
        """Drop entries older than max_age (in age_unit); returns how many were dropped."""
        dropped = 0
        for p in list(self.entries):
            keep = [e for e in self.entries[p] if self.age(e, iteration) <= self.max_age]
            dropped += len(self.entries[p]) - len(keep)
            if keep:
                self.entries[p] = keep
            else:
                del self.entries[p]
        return dropped

    def best(self, prompt: str, iteration: int, k: int) -> list[Entry]:
        lst = sorted(self.entries.get(prompt, []), key=lambda x: self._score(x, iteration), reverse=True)
        return lst[:k]

    def select(self, iteration: int, prompts: list[str], group_ids: torch.Tensor, rewards: torch.Tensor, *,
               k: int, rule: str, metadata: list[dict] | None = None) -> list[tuple[int, Entry]]:
        """For each group (rows of all ranks, in global order) the up-to-k best stored trajectories of
        its prompt that the admission rule lets in → [(group id, entry)]."""
        out = []
        for g in torch.unique(group_ids).tolist():
            idx = torch.nonzero(group_ids == g).flatten()
            i0 = int(idx[0])
            for e in self.best(prompt_key(prompts[i0], metadata[i0] if metadata else None), iteration, k):
                if admit(rule, e.reward, rewards[idx]):
                    out.append((g, e))
        return out

    def __len__(self) -> int:
        return sum(len(v) for v in self.entries.values())

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for v in self.entries.values() for e in v)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, {"entries": one record per entry, "visits": the prompts' visit counts})."""
        tensors: dict[str, torch.Tensor] = {}
        meta: list[dict] = []
        j = 0
        for lst in self.entries.values():
            for e in lst:
                for name in ("reward_raw", "steps", "x", "x_next", "log_prob", "step_rewards", "final"):
                    t = getattr(e, name)
                    if t is not None:
                        tensors[f"{j}.{name}"] = t.contiguous()
                meta.append({"prompt": e.prompt, "reward": e.reward, "version": e.version, "meta": e.meta,
                             "visit": e.visit})
                j += 1
        return tensors, {"entries": meta, "visits": dict(self.visits)}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], state) -> None:
        """`state`: the dict of state_dict, or a list of entry records (checkpoints before visits)."""
        meta = state["entries"] if isinstance(state, dict) else state
        self.visits = {str(k): int(v) for k, v in (state.get("visits", {}) if isinstance(state, dict) else {}).items()}
        self.entries = {}
        for j, m in enumerate(meta):
            e = Entry(prompt=m["prompt"], reward=m["reward"], version=m["version"],
                      reward_raw=tensors[f"{j}.reward_raw"], steps=tensors[f"{j}.steps"], x=tensors[f"{j}.x"],
                      x_next=tensors[f"{j}.x_next"], log_prob=tensors[f"{j}.log_prob"],
                      step_rewards=tensors.get(f"{j}.step_rewards"), final=tensors.get(f"{j}.final"),
                      meta=m.get("meta") or {}, visit=int(m.get("visit", 0)))
            self.entries.setdefault(prompt_key(m["prompt"], e.meta), []).append(e)
