"""The objective part: what the update minimises (`objective.kind`).

An objective is an object with this protocol (the trainer calls it and nothing else):

    sampling()                      context: the weights the rollout samples with (a behaviour policy)
    old_log_probs(states, train, cond, chunks) -> [R, T] | None
                                    log π_old of stored transitions in `chunks` (replayed rows'
                                    importance weights); None when the objective has no likelihood
    begin(batch, iteration, first)  before the first optimizer step (cache old predictions); `first`:
                                    the positions in batch.chunks of minibatch 0, which the update
                                    trains first, before any optimizer step: an old prediction at
                                    the current weights there may come from chunk_loss's own forward
    chunk_loss(batch, idx, count)   backward the loss of chunk `idx`; returns stats dicts; an objective
                                    with a likelihood hands each step's log π_θ to batch.pending
                                    (replay.PendingPiOld) when there is one
    merge(stats) -> metrics         means of the stats over all ranks' chunks
    end(iteration)                  after the iteration's optimizer steps
    state_dict() / load_state_dict  what a checkpoint keeps

The normaliser `count` is the number of trained (row, step) pairs in the minibatch over all ranks,
whatever the objective, so accumulating chunk losses gives the minibatch mean.

Registered objectives (`OBJECTIVES` is the only list of names; the config's allowed values come
from it):
- clipped_surrogate: Flow-GRPO's clipped ratio on stored SDE transitions (+ IS weights, KL).
- diffusion_nft:     DiffusionNFT (arXiv 2509.16117), flow matching on final samples with
                     implicit positive/negative policies.
- awm:               Advantage Weighted Matching (arXiv 2509.25050), the advantage-weighted
                     flow-matching loss on final samples.
Adding one: a module here with a class taking (ctx, cfg), and one line in `OBJECTIVES`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from flowpo.policy.base import Policy


@dataclass
class Context:
    """What every objective may use: the policy, the training grid and the rollout's settings."""

    policy: Policy
    sigmas: torch.Tensor        # [T+1]
    kernel: Callable            # the step kernel (flowpo.sde)
    guidance: float
    noise_level: float
    reduction: str
    seed: int
    params: list                # the trainable parameters (objectives with an old-policy copy)
    resync: Callable = lambda: None  # FSDP2: refresh the gathered full weights after a swap


def merge_sums(stats: list[dict]) -> dict[str, float]:
    """Stats dicts of sums with a `count` → means (keys ending in `_max` → max)."""
    n = sum(s["count"] for s in stats)
    if n == 0:
        return {}
    keys = [k for k in stats[0] if k != "count"]
    out = {}
    for k in keys:
        if k.endswith("_max"):
            out[k] = max(s[k] for s in stats)
        else:
            out[k] = sum(s[k] for s in stats) / n
    out["stats/transitions"] = float(n)
    return out


def build_objective(name: str, ctx: Context, cfg):
    """The objective `name` (objective.kind) for the run config `cfg`."""
    return OBJECTIVES[name](ctx, cfg)


from flowpo.objectives.awm import AWM  # noqa: E402  (the classes import Context and merge_sums)
from flowpo.objectives.clipped import ClippedSurrogate  # noqa: E402
from flowpo.objectives.nft import DiffusionNFT  # noqa: E402

OBJECTIVES: dict[str, type] = {"clipped_surrogate": ClippedSurrogate, "diffusion_nft": DiffusionNFT, "awm": AWM}
