"""Group statistics: the one home of a GRPO group's mean and spread (advantages, replay, logging).

A group is the rows that share a prompt in one iteration (`group_ids`). Shapes: N rows, M values
per row.
"""
from __future__ import annotations

import torch

SPREAD_TOL = 1e-6
"""Rewards closer than this count as equal: a group whose rewards all are has no GRPO signal."""


def group_stats(values: torch.Tensor, group_ids: torch.Tensor,
                valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's group mean and population std over all (valid) entries of the group's rows, in
    float64 → ([N], [N]). values [N] or [N, M]; valid [N, M] bool (None: all)."""
    uniq, inv = torch.unique(group_ids, return_inverse=True)
    flat = values.reshape(values.shape[0], -1).to(torch.float64)                 # [N, M]
    v = torch.ones_like(flat) if valid is None else valid.reshape(flat.shape).to(flat.dtype)
    g = uniq.numel()
    n = torch.zeros(g, dtype=flat.dtype).index_add_(0, inv, v.sum(1)).clamp_min(1)
    mean = torch.zeros(g, dtype=flat.dtype).index_add_(0, inv, (flat * v).sum(1)) / n
    var = torch.zeros(g, dtype=flat.dtype).index_add_(0, inv, (((flat - mean[inv, None]) ** 2) * v).sum(1)) / n
    return mean[inv], var.sqrt()[inv]


def flat_groups(values: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """[N] bool: the row's group has (almost) no spread in `values` [N] (std < SPREAD_TOL)."""
    return group_stats(values, group_ids)[1] < SPREAD_TOL


def flat_share(values: torch.Tensor, group_ids: torch.Tensor) -> float:
    """Share of the groups whose `values` [N] are all equal (no GRPO signal from them)."""
    _, first = first_rows(group_ids)
    return float(flat_groups(values, group_ids)[first].float().mean()) if len(first) else 0.0


def first_rows(group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the distinct group ids in increasing order, the first row of each)."""
    uniq, inv = torch.unique(group_ids, return_inverse=True)
    first = torch.full((uniq.numel(),), group_ids.numel(), dtype=torch.long)
    first.scatter_reduce_(0, inv, torch.arange(group_ids.numel()), reduce="amin")
    return uniq, first
