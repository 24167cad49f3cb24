"""Typed loss stats: each objective returns, per (chunk, step), a NamedTuple of detached 0-dim
tensors (sums over its transitions, and a `count`); the update stacks them once and converts them
to Python floats once per iteration (`merge`), so the hot loop never waits for the device.

A stats class lists its metrics in `METRICS`: field → (metric name, "sum" | "max"); a "sum"
field is logged as its mean over all ranks' transitions (sum / Σ count), a "max" field as its max.
"""
from __future__ import annotations

import torch


def scalar(value, like: torch.Tensor) -> torch.Tensor:
    """A detached float64 0-dim tensor on `like`'s device (no host sync)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(torch.float64)
    return torch.full((), float(value), dtype=torch.float64, device=like.device)


def merge(cls, stats: list, dist=None) -> dict[str, float]:
    """Metrics of this rank's records of stats class `cls`, over all ranks of `dist`
    (flowpo.training.distributed.Dist; None: this rank only). One device→host copy."""
    fields = cls._fields
    table = (torch.stack([torch.stack(list(s)) for s in stats]).cpu() if stats    # [n, F] float64
             else torch.zeros(0, len(fields), dtype=torch.float64))
    if dist is not None:
        table = dist.all_gather_cat(table)
    if not len(table):
        return {}
    cols = table.t().contiguous()                                                   # [F, n]
    sums, maxes = torch.stack([cols.sum(1), cols.max(1).values]).tolist()          # one conversion
    n = sums[fields.index("count")]
    if n == 0:
        return {}
    out = {}
    for j, name in enumerate(fields):
        if name != "count":
            metric, how = cls.METRICS[name]
            out[metric] = maxes[j] if how == "max" else sums[j] / n
    out["stats/transitions"] = float(n)
    return out
