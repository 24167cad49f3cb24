"""torch.distributed glue: rank/world from torchrun's environment, gathers, gradient averaging.

With WORLD_SIZE unset or 1 every call is a no-op, so the trainer has one code path. Backend: nccl
when CUDA is available, gloo otherwise. Collective timeouts come from `FLOWPO_DIST_TIMEOUT_S`
(default 600 s) so a dead or stalled rank makes the others fail with an error instead of hanging.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


class Dist:
    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if self.world > 1 and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            timeout = datetime.timedelta(seconds=float(os.environ.get("FLOWPO_DIST_TIMEOUT_S", "600")))
            dist.init_process_group(backend=backend, timeout=timeout)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def split(self, n: int) -> slice:
        """This rank's contiguous slice of n global rows (n must divide evenly)."""
        if n % self.world:
            raise ValueError(f"{n} rows per iteration do not split over {self.world} processes; "
                             f"make sample.prompts_per_iteration × group size a multiple of {self.world}")
        per = n // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def all_gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate equal-shaped tensors of all ranks along dim 0, in rank order."""
        if self.world == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum gradients over ranks (the loss is already normalised by the global count)."""
        if self.world == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        off = 0
        for g in grads:
            g.copy_(flat[off:off + g.numel()].view_as(g))
            off += g.numel()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
