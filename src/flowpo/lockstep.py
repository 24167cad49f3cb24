"""Lock-step model calls: FSDP2 full sharding over ranks, where every forward and backward is a
collective, so all ranks must make the same sequence of model calls whatever rows they hold.

The builder wraps the policy in `LockstepPolicy` when the run shards (Dist.lockstep); no other
part knows about it. Parts whose loops depend on their rows (which steps to run, how many chunks,
which tail starts) ask the policy's agreement through `agreed_steps` / `agreed_count` /
`agreed_values`: under lock-step one small all-reduce or gather makes every rank run the union;
for any other policy (one process, replicated LoRA ranks) they return the rank's own values, with
no communication.

`dist` below is a flowpo.training.distributed.Dist (duck-typed: guard, any_over_ranks,
max_over_ranks, all_gather_objects), so this module imports nothing from the training loop.
"""
from __future__ import annotations

import torch


class LockstepPolicy:
    """A policy under lock-stepped FSDP2: every `velocity` is a collective, guarded (a dead or
    stalled peer raises DistributedError naming it), and a call with no rows (a rank whose part of
    a global chunk is empty) runs one dummy row of zeros and returns the empty result, still
    attached to the graph, so the backward is a collective too. Everything else is the wrapped
    policy's."""

    def __init__(self, policy, dist):
        self.__dict__["_inner"] = policy
        self.__dict__["dist"] = dist

    def __getattr__(self, name):
        return getattr(self.__dict__["_inner"], name)

    def __setattr__(self, name, value):
        setattr(self.__dict__["_inner"], name, value)

    def encode_prompts(self, prompts: list[str], *images):
        if len(prompts) or images:  # an editing policy makes its own empty rows (flowpo.policy.edit)
            return self._inner.encode_prompts(prompts, *images)
        return {k: v[:0] for k, v in self._inner.encode_prompts([""]).items()}

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond, guidance: float) -> torch.Tensor:
        with self.dist.guard("fsdp forward"):
            if x.shape[0]:
                return self._inner.velocity(x, sigma, cond, guidance)
            x1 = x.new_zeros((1, *x.shape[1:]))
            s1 = torch.full((1,), 0.5, device=x.device)
            c1 = {k: v.new_zeros((1, *v.shape[1:])) for k, v in cond.items()}
            return self._inner.velocity(x1, s1, c1, guidance)[:0]


def is_lockstep(policy) -> bool:
    """Whether `policy`'s calls are collectives every rank must make alike."""
    return isinstance(policy, LockstepPolicy)


def agreed_steps(policy, mask: torch.Tensor) -> list[int]:
    """The steps where `mask` [T] is set on any rank under lock-step (else this rank's): the steps
    whose model calls every rank makes, with or without rows of its own to train there."""
    if is_lockstep(policy):
        mask = policy.dist.any_over_ranks(mask)
    return torch.nonzero(mask).flatten().tolist()


def agreed_count(policy, n: int) -> int:
    """max over ranks of n under lock-step (a number of chunks or rows to run), else n."""
    return policy.dist.max_over_ranks(n) if is_lockstep(policy) else n


def agreed_values(policy, values) -> list:
    """The sorted union over ranks of `values` under lock-step, else sorted(set(values))."""
    if not is_lockstep(policy):
        return sorted(set(values))
    return sorted({v for part in policy.dist.all_gather_objects(sorted(set(values))) for v in part})
