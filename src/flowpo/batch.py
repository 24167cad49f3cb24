"""The data that moves between parts in one iteration.

`GlobalBatch`: the iteration's fresh rows of *all* ranks after rollout and rewards, gathered once
(in global row order). Advantages and replay selection are plain functions of it, so they are the
same on every rank and testable without processes. `UpdateBatch`: this rank's rows that the
objective trains on (its fresh rows, then its share of the replayed rows).

Shapes: N global rows, n local rows, M update rows, T steps, D latent dims, K rewards.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from flowpo.policy.base import Cond

if TYPE_CHECKING:
    from flowpo.replay import PendingPiOld


@dataclass
class GlobalBatch:
    """Fresh rows of every rank, in global order."""

    prompts: list[str]              # [N]
    group_ids: torch.Tensor         # [N] long
    raw: torch.Tensor               # [N, K] raw rewards (CPU)
    train: torch.Tensor             # [N, T] bool trained steps
    states: torch.Tensor            # [N, T+1, *D]
    log_probs: torch.Tensor         # [N, T] behaviour log-probs
    final: torch.Tensor             # [N, *D] final latents
    step_rewards: torch.Tensor | None = None  # [N, T+1, K] intermediate rewards (stepwise credit)
    metadata: list[dict] = field(default_factory=list)  # [N] the prompts' metadata (flowpo.prompts); [] = none

    @property
    def n(self) -> int:
        return len(self.prompts)


@dataclass
class ReplayRows:
    """What the advantage estimator needs of R replayed rows (global, all ranks')."""

    raw: torch.Tensor               # [R, K]
    group_ids: torch.Tensor         # [R] long
    valid: torch.Tensor             # [R, T] bool: the steps each replayed row keeps
    step_rewards: torch.Tensor | None = None  # [R, T+1, K]


@dataclass
class UpdateBatch:
    """Everything the objective trains on: M rows (this rank's fresh rows, then its replayed ones)."""

    states: torch.Tensor       # [M, T+1, *D]
    final: torch.Tensor        # [M, *D] final latents (objectives on final samples)
    train: torch.Tensor        # [M, T] bool
    old_log_prob: torch.Tensor  # [M, T] π_old
    adv: torch.Tensor          # [M, T]
    weight: torch.Tensor       # [M, T] detached importance weights (1 for fresh rows)
    cond: Cond                 # rows [M, ...]
    chunks: list[torch.Tensor]  # row indices; fresh chunks equal the rollout's
    chunk_ids: list[int]       # global chunk index of each chunk
    n_chunks: int              # global chunks (fresh + replayed) over all ranks
    row_ids: torch.Tensor      # [M] long: global row id (fresh: 0..N−1, replayed: N + j); seeds per-row noise
    pending: PendingPiOld | None = None  # replayed (row, step) pairs whose π_old and weight the
                                         # update's first forward gives; None: all are known


def minibatch_of(chunk_id: int, n_chunks: int, minibatches: int) -> int:
    """The minibatch that global chunk `chunk_id` of `n_chunks` trains in: chunk_id mod the number
    of minibatches per pass (train.minibatches, at most one per chunk, since a minibatch is whole
    chunks). The same on every rank. Minibatch 0 of the first pass runs before the update's first
    optimizer step, at the iteration's starting weights."""
    return chunk_id % max(1, min(minibatches, n_chunks))
