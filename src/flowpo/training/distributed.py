"""torch.distributed glue: rank/world from torchrun's environment, gathers, gradient reduction,
FSDP2 sharding for full fine-tuning, and collectives that fail loudly instead of hanging.

    torchrun --nproc_per_node=2 -m flowpo train --out runs/x ...      (docs/distributed.md)

With WORLD_SIZE unset or 1 every call is a no-op, so the trainer has one code path. Backend: nccl
when CUDA is available, gloo otherwise (no accelerate: it silently runs independent processes on
CPU, REFERENCE.md pitfalls).

Gradients. The loss of every rank is already divided by the *global* count of trained
transitions, so the global gradient is the plain sum of the ranks' gradients:
    ∇L = Σ_r ∇L_r,   L_r = Σ_{i ∈ rank r} ℓ_i / count_global.
- LoRA (few MB of parameters): one flat all-reduce (sum) per optimizer step. This is what DDP does
  (DDP averages, i.e. sums then divides by world; with the global normaliser the division is not
  wanted), without DDP's forward wrapper: the policy calls its module directly, many times per
  step (chunks × trained steps, reference passes), with a rank-dependent number of calls, which
  DDP's per-forward hooks and `no_sync` bookkeeping do not fit. Initial trainable weights are
  broadcast from rank 0, as DDP does at construction.
- full fine-tuning: FSDP2 (`fully_shard`) on the policy's module. Parameters and optimizer state
  are sharded (DTensor); the module is kept *unsharded* between optimizer steps
  (`gather_params`), so forwards and backwards do no communication and ranks may run different
  numbers of model calls; gradients accumulate locally (`set_requires_gradient_sync(False)`) and
  are reduce-scattered (sum) by one tiny synchronising backward per optimizer step that every
  rank runs (`sync_gradients`).

Timeouts. Every collective runs under `FLOWPO_DIST_TIMEOUT_S` (default 600 s). A dead peer or one
that does not arrive in time raises `DistributedError` naming this rank, the collective, how far
each rank got (from the rendezvous store) and what to do, instead of hanging.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn


class DistributedError(RuntimeError):
    """A collective failed: a peer died, stalled past the timeout, or disagreed."""


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "full_tensor")


class Dist:
    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.timeout_s = float(os.environ.get("FLOWPO_DIST_TIMEOUT_S", "600"))
        self.fsdp: nn.Module | None = None  # the fully_shard-ed module in full fine-tuning
        self._seq = 0                        # collectives entered by this rank (for diagnostics)
        self._store = None
        if self.world > 1 and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(self.local_rank)
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=self.timeout_s))
        if self.world > 1:
            try:
                self._store = dist.distributed_c10d._get_default_store()
            except Exception:  # diagnostics only
                self._store = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ failure reporting
    @contextlib.contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        """Run one collective; turn a timeout or a lost peer into a DistributedError that says why."""
        if self.world == 1:
            yield
            return
        self._seq += 1
        self._mark(f"{self._seq}:{what}")
        try:
            yield
        except Exception as e:
            if isinstance(e, DistributedError):
                raise
            raise DistributedError(self._explain(what, e)) from e

    def _mark(self, value: str) -> None:
        if self._store is not None:
            try:
                self._store.set(f"flowpo/progress/{self.rank}", value)
            except Exception:
                self._store = None

    def _explain(self, what: str, err: Exception) -> str:
        peers = []
        if self._store is not None:
            try:
                self._store.set_timeout(datetime.timedelta(seconds=2))
                for r in range(self.world):
                    if r != self.rank:
                        v = self._store.get(f"flowpo/progress/{r}").decode() if self._store.check(
                            [f"flowpo/progress/{r}"]) else "0:none"
                        seq, name = v.split(":", 1)
                        state = "behind: stalled or dead" if int(seq) < self._seq else "arrived"
                        peers.append(f"rank {r} last entered collective #{seq} ({name}) [{state}]")
            except Exception:
                peers.append("peer progress unavailable (the rendezvous store is gone: the main process died?)")
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        return (f"rank {self.rank}/{self.world}: collective #{self._seq} ({what}) failed within "
                f"FLOWPO_DIST_TIMEOUT_S={self.timeout_s:g}s: {first}. "
                + ("; ".join(peers) + ". " if peers else "")
                + "Another rank died or stalled: read its log (torchrun prefixes lines with the rank) "
                "for the first error; if a step legitimately takes longer (big model, slow reward), "
                "raise FLOWPO_DIST_TIMEOUT_S.")

    # ------------------------------------------------------------------ rows and gathers
    def split(self, n: int) -> slice:
        """This rank's contiguous slice of n global rows: ⌊n/W⌋ each, the first n mod W ranks one
        more (any n: OP-GRPO's groups vary in size; rank order is global row order)."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    @staticmethod
    def local_chunks(global_chunks: list[torch.Tensor], local: slice) -> tuple[list[torch.Tensor], list[int]]:
        """This rank's part of each global chunk of rows, as local row indices, and the global
        index of each non-empty part. Minibatches are defined on global chunks, so a 1-process
        and an N-process run update on the same rows at each optimizer step."""
        chunks, ids = [], []
        for g, c in enumerate(global_chunks):
            mine = c[(c >= local.start) & (c < local.stop)] - local.start
            if mine.numel():
                chunks.append(mine)
                ids.append(g)
        return chunks, ids

    def all_gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate the ranks' tensors along dim 0, in rank order (dim 0 may differ by rank:
        the sizes are exchanged first and the parts padded to the largest)."""
        if self.world == 1:
            return t
        home = t.device
        t = t.to(self.comm_device)  # nccl needs CUDA tensors, gloo takes CPU ones
        size = torch.tensor([t.shape[0]], device=self.comm_device)
        sizes = [torch.empty_like(size) for _ in range(self.world)]
        with self._guard("all_gather sizes"):
            dist.all_gather(sizes, size)
        sizes_i = [int(s) for s in sizes]
        big = max(sizes_i)
        if t.shape[0] < big:
            t = torch.cat([t, t.new_zeros((big - t.shape[0], *t.shape[1:]))])
        parts = [torch.empty_like(t) for _ in range(self.world)]
        with self._guard(f"all_gather {tuple(t.shape)}"):
            dist.all_gather(parts, t.contiguous())
        return torch.cat([p[:k] for p, k in zip(parts, sizes_i)]).to(home)

    def all_gather_objects(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] (picklable objects; small metadata only)."""
        if self.world == 1:
            return [obj]
        out: list = [None] * self.world
        with self._guard("all_gather_object"):
            dist.all_gather_object(out, obj)
        return out

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            buf = t.to(self.comm_device)
            with self._guard(f"all_reduce {tuple(t.shape)}"):
                dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            if buf is not t:
                t.copy_(buf)
        return t

    @property
    def comm_device(self) -> torch.device:
        """Where collective buffers live: the rank's GPU under nccl, else the CPU."""
        if self.world > 1 and dist.is_initialized() and dist.get_backend() == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def all_true(self, ok: bool) -> bool:
        """True on every rank iff `ok` on every rank (agree before raising, so no rank is left waiting)."""
        flag = torch.tensor([0.0 if ok else 1.0])
        return float(self.all_reduce_sum(flag)) == 0.0

    def barrier(self) -> None:
        if self.world > 1:
            with self._guard("barrier"):
                dist.barrier()

    # ------------------------------------------------------------------ wrapping and gradients
    def wrap(self, module: nn.Module, params: list[nn.Parameter], full: bool) -> None:
        """Prepare the policy's module for training on `world` ranks (call before building the
        optimizer, and take the trainable parameters *after* it: FSDP2 replaces them by DTensors).

        full=False (LoRA): broadcast the trainable tensors from rank 0.
        full=True: `fully_shard` the module (FSDP2), sum-reduction, no gradient sync per backward,
        parameters kept gathered between optimizer steps."""
        if self.world == 1:
            return
        if not full:
            with self._guard("broadcast initial weights"), torch.no_grad():
                for p in params:
                    dist.broadcast(p.data, src=0)
            return
        from torch.distributed.fsdp import fully_shard

        fully_shard(module, reshard_after_forward=False)
        module.set_reshard_after_backward(False)
        module.set_requires_gradient_sync(False)
        module.set_gradient_divide_factor(1.0)      # sum, not mean (global normaliser)
        module.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
        self.fsdp = module

    def gather_params(self) -> None:
        """FSDP2: (re)gather the full parameters from the shards, e.g. after an optimizer step or
        after writing into the sharded parameters (EMA swap, checkpoint load). No-op otherwise."""
        if self.fsdp is not None:
            with self._guard("fsdp all_gather params"):
                self.fsdp.reshard()
                self.fsdp.unshard()

    def shard_params(self) -> None:
        """FSDP2: drop the gathered copy; the module's parameters are the DTensor shards again."""
        if self.fsdp is not None:
            self.fsdp.reshard()

    def sync_gradients(self, params: list[nn.Parameter], probe: Callable[[], torch.Tensor]) -> None:
        """Make every rank's gradients the sum over ranks (see module docstring).

        probe(): a forward of the module on one row (any output); FSDP2 reduce-scatters the
        accumulated gradients in the backward of 0·probe(), which every rank runs once."""
        if self.world == 1:
            return
        if self.fsdp is not None:
            with self._guard("fsdp reduce_scatter grads"):
                self.fsdp.set_requires_gradient_sync(True)
                try:
                    (probe().float().sum() * 0.0).backward()
                finally:
                    self.fsdp.set_requires_gradient_sync(False)
            return
        for p in params:  # a rank without rows in this minibatch still takes part, with zeros
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        with self._guard(f"all_reduce grads {flat.numel()}"):
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        off = 0
        for p in params:
            p.grad.copy_(flat[off:off + p.grad.numel()].view_as(p.grad))
            off += p.grad.numel()

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> float:
        """clip_grad_norm_ that also works on FSDP2's DTensor gradients; returns the global norm."""
        with self._guard("grad norm") if self.fsdp is not None else contextlib.nullcontext():
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            return float(norm.full_tensor() if _is_dtensor(norm) else norm)

    # ------------------------------------------------------------------ checkpoint tensors
    def full(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Full (unsharded) copies of DTensors; plain tensors pass through. Collective under FSDP2:
        every rank must call it, in the same order."""
        if not any(_is_dtensor(v) for v in tensors.values()):
            return tensors
        out = {}
        with self._guard("fsdp gather checkpoint"):
            for k, v in tensors.items():
                out[k] = v.full_tensor().detach().clone() if _is_dtensor(v) else v
        return out

    def like(self, full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """`full` sharded as `ref` when ref is a DTensor of the same global shape, else `full`."""
        if not _is_dtensor(ref) or tuple(full.shape) != tuple(ref.shape):
            return full
        from torch.distributed.tensor import distribute_tensor

        with self._guard("fsdp shard checkpoint"):
            return distribute_tensor(full.to(ref.dtype), ref.device_mesh, ref.placements)
