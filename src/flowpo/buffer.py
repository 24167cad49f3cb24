"""OP-GRPO replay buffer (arXiv 2604.04142): keep, per prompt, the best past trajectories and mix
them into later groups.

An entry is one row of a flowpo.trajectory.Trajectory (every per-row field travels with it) whose
train mask is cut to the kept steps: late steps (σ_t < truncate_sigma, or the last fraction) are
truncated at insertion, since their off-policy ratios are ill-conditioned (log-ratio variance grows
like 1/s², docs/samplers.md). Of the states only those the kept steps touch are stored
(x_t and x_{t+1} of each kept t; `Entry.state_index`), on the CPU.

Ranking: score = reward − decay·age; each prompt keeps its `capacity` best; entries older than
`max_age` iterations expire. The adaptive admission rule decides, per group, whether the replayed
trajectory enters (see `admit`). The paper's exact capacity/decay/adaptive rule is not public: these
are the project's choices, exposed as options (REFERENCE.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from flowpo.groups import flat_groups
from flowpo.trajectory import ROW_FIELDS, Trajectory, cat

_STORED = tuple(f for f in ROW_FIELDS if f not in ("cond", "uncond", "states", "adv", "old_log_probs", "old_known", "weights",
                                                    "group_ids", "row_ids"))
"""Row fields an entry keeps (states compacted); the per-iteration ones (advantages, π_old, weights,
ids) are made anew when the row is replayed."""


@dataclass(eq=False)
class Entry:
    """One stored trajectory: a row with its kept steps (`row.train`) and the states they touch."""

    row: Trajectory               # one row, CPU; row.states is [1, S', *D]: the states at `state_index`
    state_index: torch.Tensor     # [S'] long: grid indices of the stored states
    reward: float                 # combined (weighted) reward when stored
    visit: int = 0                # the prompt's visit count when it was stored (replay.age_unit=visits)

    prompt = property(lambda self: self.row.prompts[0])
    meta = property(lambda self: self.row.metadata[0])
    version = property(lambda self: int(self.row.versions[0]))
    reward_raw = property(lambda self: self.row.raw[0])                          # [K]
    final = property(lambda self: self.row.final[0])                             # [*D]
    steps = property(lambda self: torch.nonzero(self.row.train[0]).flatten())   # [S] kept steps t

    def state(self, t: torch.Tensor | int) -> torch.Tensor:
        """x_t of grid indices t (stored ones)."""
        pos = torch.searchsorted(self.state_index, torch.as_tensor(t))
        return self.row.states[0, pos]

    x = property(lambda self: self.state(self.steps))                             # [S, *D] x_t
    x_next = property(lambda self: self.state(self.steps + 1))                    # [S, *D] x_{t+1}
    log_prob = property(lambda self: self.row.log_probs[0, self.steps])           # [S] behaviour log-probs

    def full_row(self, T: int) -> Trajectory:
        """The row with its states on the whole grid [1, T+1, *D] (zeros where none is stored)."""
        states = self.row.states.new_zeros((1, T + 1, *self.row.states.shape[2:]))
        states[0, self.state_index] = self.row.states[0]
        return self.row.replace(states=states)

    @property
    def nbytes(self) -> int:
        ts = [getattr(self.row, f) for f in _STORED if isinstance(getattr(self.row, f), torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in ts + [self.row.states, self.state_index])


def _beats_best(replay_reward: float, fresh: torch.Tensor) -> bool:
    return replay_reward > float(fresh.max())


def _no_spread(replay_reward: float, fresh: torch.Tensor) -> bool:
    return bool(flat_groups(fresh, torch.zeros(len(fresh), dtype=torch.long))[0])


ADMISSION = {
    "always": lambda replay_reward, fresh: True,
    "beats_best": _beats_best,
    "no_spread": _no_spread,
    "beats_best_or_no_spread": lambda replay_reward, fresh: _beats_best(replay_reward, fresh)
    or _no_spread(replay_reward, fresh),
}
"""Adaptive incorporation rules for one group (replay.rule → fn(replay reward, fresh rewards [G])):

always:                  always mix the replayed trajectory in.
beats_best:              only if it beats every fresh sample (it then carries a positive signal).
no_spread:               only if the fresh group has (almost) no reward spread, so GRPO would
                         otherwise get zero advantages and waste the group.
beats_best_or_no_spread: either of the two (default).
"""


def admit(rule: str, replay_reward: float, fresh_rewards: torch.Tensor) -> bool:
    """Whether `rule` (a key of ADMISSION) lets a replayed trajectory into a group."""
    if rule not in ADMISSION:
        raise ValueError(f"replay.rule={rule!r}; allowed: {', '.join(ADMISSION)}")
    return ADMISSION[rule](replay_reward, fresh_rewards)


def prompt_key(prompt: str, meta: dict | None = None) -> str:
    """The buffer's key of a prompt: its text, plus its metadata when it has any (two .jsonl rows
    with the same text but other metadata, e.g. another OCR target, are different prompts)."""
    import json

    return prompt if not meta else prompt + "\x00" + json.dumps(meta, sort_keys=True, default=str)


class ReplayBuffer:
    """Best past trajectories per prompt. Age (for expiry after `max_age` and the ranking decay) is
    counted in iterations, or in the prompt's own visits (`age_unit="visits"`: the number of times
    its prompt was drawn since it was stored), so an entry of a prompt that was not drawn does not
    age. `truncation`: the bool [T] mask of steps a stored row may keep (flowpo.plans.truncation_keep;
    None keeps every trained step)."""

    def __init__(self, sigmas: torch.Tensor, *, capacity_per_prompt: int = 2, max_age: int = 8,
                 decay: float = 0.0, truncation: torch.Tensor | None = None, age_unit: str = "iterations"):
        if age_unit not in ("iterations", "visits"):
            raise ValueError(f"replay.age_unit={age_unit!r}; allowed: iterations, visits")
        self.sigmas = sigmas
        self.capacity = capacity_per_prompt
        self.max_age = max_age
        self.decay = decay
        self.truncation = truncation
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
        keep = train_row.cpu().clone()
        if self.truncation is not None:
            keep &= self.truncation
        return torch.nonzero(keep).flatten()

    def add(self, rows: Trajectory, rewards: torch.Tensor, eligible: torch.Tensor | None = None) -> int:
        """Offer N trajectories (`rows`, with their raw rewards; `rewards` [N] combined, the ranking
        score); returns how many were kept."""
        added = 0
        T = rows.train.shape[1]
        versions = rows.versions.tolist()
        for i, p in enumerate(rows.prompts):
            if eligible is not None and not bool(eligible[i]):
                continue
            key = prompt_key(p, rows.metadata[i])
            steps = self.kept_steps(rows.train[i])
            if steps.numel() == 0:
                continue
            e = self._entry(rows, i, steps, T, float(rewards[i]), self.visits.get(key, 0))
            lst = self.entries.setdefault(key, [])
            lst.append(e)
            lst.sort(key=lambda x: self._score(x, versions[i]), reverse=True)
            del lst[self.capacity:]
            added += int(any(x is e for x in lst))
        return added

    @staticmethod
    def _entry(rows: Trajectory, i: int, steps: torch.Tensor, T: int, reward: float, visit: int) -> Entry:
        """Row i of `rows` as an entry keeping `steps`: its stored fields copied to the CPU (GPU memory
        is for the model), of the states only those the kept steps touch."""
        keep = torch.zeros(T, dtype=torch.bool)
        keep[steps] = True
        index = torch.unique(torch.cat([steps, steps + 1]))                      # [S'] sorted
        kept = {f: getattr(rows, f)[i:i + 1].detach().cpu().clone() for f in _STORED
                if isinstance(getattr(rows, f), torch.Tensor) and getattr(rows, f).numel()}  # (not [N, 0])
        kept["log_probs"] = torch.where(keep, kept["log_probs"][0], torch.zeros(()))[None]
        kept["train"] = keep[None]
        states = rows.states[i:i + 1, index.to(rows.states.device)].detach().cpu()   # [1, S', *D]
        row = Trajectory(prompts=[rows.prompts[i]], metadata=[dict(rows.metadata[i] or {})], states=states, **kept)
        return Entry(row=row, state_index=index, reward=reward, visit=visit)

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
               k: int, rule, metadata: list[dict] | None = None) -> list[tuple[int, Entry]]:
        """For each group (rows of all ranks, in global order) the up-to-k best stored trajectories of
        its prompt that the admission rule (a name of ADMISSION, or its function) lets in → [(group id, entry)]."""
        rule = ADMISSION[rule] if isinstance(rule, str) else rule
        out = []
        for g in torch.unique(group_ids).tolist():
            idx = torch.nonzero(group_ids == g).flatten()
            i0 = int(idx[0])
            for e in self.best(prompt_key(prompts[i0], metadata[i0] if metadata else None), iteration, k):
                if rule(e.reward, rewards[idx]):
                    out.append((g, e))
        return out

    def __len__(self) -> int:
        return sum(len(v) for v in self.entries.values())

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for v in self.entries.values() for e in v)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors `<j>.<row field>`, {"entries": one record per entry, "visits": the visit counts})."""
        tensors: dict[str, torch.Tensor] = {}
        meta: list[dict] = []
        for j, e in enumerate(e for lst in self.entries.values() for e in lst):
            for name in _STORED + ("states",):
                t = getattr(e.row, name)
                if isinstance(t, torch.Tensor):
                    tensors[f"{j}.{name}"] = t.contiguous()
            tensors[f"{j}.state_index"] = e.state_index
            meta.append({"prompt": e.prompt, "reward": e.reward, "meta": e.meta, "visit": e.visit, "format": 2})
        return tensors, {"entries": meta, "visits": dict(self.visits)}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], state) -> None:
        """`state`: the dict of state_dict, or a list of entry records (checkpoints before visits).
        Checkpoints before entries were rows (x, x_next, log_prob per kept step) are converted."""
        meta = state["entries"] if isinstance(state, dict) else state
        self.visits = {str(k): int(v) for k, v in (state.get("visits", {}) if isinstance(state, dict) else {}).items()}
        self.entries = {}
        T = self.sigmas.numel() - 1
        for j, m in enumerate(meta):
            md = m.get("meta") or {}
            if m.get("format") == 2:
                fields = {f: tensors[f"{j}.{f}"] for f in _STORED + ("states",) if f"{j}.{f}" in tensors}
                e = Entry(row=Trajectory(prompts=[m["prompt"]], metadata=[md], **fields),
                          state_index=tensors[f"{j}.state_index"], reward=m["reward"], visit=int(m.get("visit", 0)))
            else:
                e = _entry_of_old_record(tensors, j, m, md, T)
            self.entries.setdefault(prompt_key(m["prompt"], e.meta), []).append(e)


def _entry_of_old_record(tensors: dict, j: int, m: dict, md: dict, T: int) -> Entry:
    """An entry of a checkpoint written before entries were rows (kept steps' x, x_next, log_prob)."""
    steps = tensors[f"{j}.steps"]
    states = torch.zeros((1, T + 1, *tensors[f"{j}.x"].shape[1:]))
    states[0, steps], states[0, steps + 1] = tensors[f"{j}.x"], tensors[f"{j}.x_next"]
    log_probs, train = torch.zeros(1, T), torch.zeros(1, T, dtype=torch.bool)
    log_probs[0, steps], train[0, steps] = tensors[f"{j}.log_prob"], True
    sr, fin = tensors.get(f"{j}.step_rewards"), tensors.get(f"{j}.final")
    row = Trajectory(prompts=[m["prompt"]], metadata=[md], versions=torch.tensor([int(m["version"])]), states=states,
                     log_probs=log_probs, train=train, raw=tensors[f"{j}.reward_raw"][None],
                     final=torch.zeros((1, *states.shape[2:])) if fin is None else fin[None],
                     step_rewards=None if sr is None else sr[None])
    index = torch.unique(torch.cat([steps, steps + 1]))
    return Entry(row=row.replace(states=states[:, index]), state_index=index, reward=m["reward"],
                 visit=int(m.get("visit", 0)))


def replayed_rows(entries: list[Entry], T: int) -> Trajectory:
    """The entries as rows of one Trajectory (states on the whole grid; no ids, advantages or π_old yet)."""
    return cat([e.full_row(T) for e in entries])
