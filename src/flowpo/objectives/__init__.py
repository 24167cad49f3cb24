"""The objective part: what the update minimises (`objective.kind`).

An objective is an object with this protocol (the trainer calls it and nothing else); `b` is the
update's flowpo.trajectory.Trajectory (this rank's rows, with their chunk layout):

    Stats                           the NamedTuple its chunk_loss returns (flowpo.stats)
    sampling(iteration)             context: the weights iteration's rollout samples with (a behaviour policy)
    begin(b, iteration, first)      before the first optimizer step: old predictions, and π_old where
                                    b.old_known is False (replayed rows; the objective owns π_old and
                                    applies b.rule); `first`: the positions in b.chunks.rows of
                                    minibatch 0, which trains before any optimizer step, so an old
                                    prediction at the current weights may come from its own forward
    chunk_loss(b, idx, count)       backward the loss of chunk `idx`; returns Stats records
    end(iteration) -> metrics       after the iteration's optimizer steps (e.g. replay/w_* stats)
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
- dgpo:              DGPO (arXiv 2510.08425), a group-level preference (DPO over groups) on
                     the matching losses of final samples.
- grpo_guard:        GRPO-Guard (arXiv 2510.22319), the clipped surrogate on a normalised
                     ratio (RatioNorm) with per-step gradient reweighting.
- flow_dppo:         Flow-DPPO (arXiv 2606.11025), the unclipped ratio surrogate masked where
                     the exact Gaussian KL to π_old exceeds δ and the update moves away.
Adding one: a module here with a class taking (ctx, cfg), and one line in `OBJECTIVES`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from flowpo.policy.base import Policy


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


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
    reduce_sum: Callable = _identity  # Σ over ranks of a tensor (Dist.all_reduce_sum; one process: itself)
    guided: Callable | None = None  # flowpo.guided.GuidedVelocity: CFG's branches as model.cfg_uncond says

    def __post_init__(self):
        if self.guided is None:  # the policy's own (joint) velocity
            from flowpo.guided import GuidedVelocity

            self.guided = GuidedVelocity(self.policy, self.guidance, "joint")


def build_objective(name: str, ctx: Context, cfg):
    """The objective `name` (objective.kind) for the run config `cfg`."""
    return OBJECTIVES[name](ctx, cfg)


from flowpo.objectives.awm import AWM  # noqa: E402
from flowpo.objectives.clipped import ClippedSurrogate  # noqa: E402
from flowpo.objectives.dgpo import DGPO  # noqa: E402
from flowpo.objectives.dppo import FlowDPPO  # noqa: E402
from flowpo.objectives.guard import GRPOGuard  # noqa: E402
from flowpo.objectives.nft import DiffusionNFT  # noqa: E402

OBJECTIVES: dict[str, type] = {"clipped_surrogate": ClippedSurrogate, "diffusion_nft": DiffusionNFT, "awm": AWM,
                               "dgpo": DGPO, "grpo_guard": GRPOGuard, "flow_dppo": FlowDPPO}
