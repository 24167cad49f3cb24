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
- full fine-tuning: FSDP2 (`fully_shard`) on every block of the policy's module and on the
  module itself (and the same on the frozen reference copy), resharded after every forward and
  backward: parameters, gradients, AdamW and EMA state stay DTensor shards, ~1/W of the model
  per rank. Every forward all-gathers a block's parameters and every backward reduce-scatters its
  gradients (sum), so every forward and backward is a collective and ranks must make the same
  sequence of model calls: `lockstep` is set and the builder wraps the policy in
  `flowpo.lockstep.LockstepPolicy` (a call with no rows runs one dummy row and returns none), whose
  loops agree on their structure (flowpo.lockstep; no-ops off lockstep, so 1 process and LoRA runs
  are unchanged).

Timeouts. Every collective runs under `FLOWPO_DIST_TIMEOUT_S` (default 600 s). A dead peer or one
that does not arrive in time raises `DistributedError` naming this rank, the collective, how far
each rank got (from the rendezvous store) and what to do, instead of hanging.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from typing import Iterator

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
        self.lockstep = False                # FSDP2 sharded between calls: every model call is a collective
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
    def guard(self, what: str) -> Iterator[None]:
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

    def local_chunks(self, global_chunks: list[torch.Tensor], local: slice) -> tuple[list[torch.Tensor], list[int]]:
        """This rank's part of each global chunk of rows, as local row indices, and the global
        index of each non-empty part (of every part under lock-step: FSDP2's sharded mode, where a
        rank without rows in a chunk still makes that chunk's model calls). Minibatches are
        defined on global chunks, so a 1-process and an N-process run update on the same rows at
        each optimizer step."""
        chunks, ids = [], []
        for g, c in enumerate(global_chunks):
            mine = c[(c >= local.start) & (c < local.stop)] - local.start
            if mine.numel() or self.lockstep:
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
        with self.guard("all_gather sizes"):
            dist.all_gather(sizes, size)
        sizes_i = [int(s) for s in sizes]
        big = max(sizes_i)
        if t.shape[0] < big:
            t = torch.cat([t, t.new_zeros((big - t.shape[0], *t.shape[1:]))])
        parts = [torch.empty_like(t) for _ in range(self.world)]
        with self.guard(f"all_gather {tuple(t.shape)}"):
            dist.all_gather(parts, t.contiguous())
        return torch.cat([p[:k] for p, k in zip(parts, sizes_i)]).to(home)

    def all_gather_objects(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] (picklable objects; small metadata only)."""
        if self.world == 1:
            return [obj]
        out: list = [None] * self.world
        with self.guard("all_gather_object"):
            dist.all_gather_object(out, obj)
        return out

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            buf = t.to(self.comm_device)
            with self.guard(f"all_reduce {tuple(t.shape)}"):
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

    def any_over_ranks(self, mask: torch.Tensor) -> torch.Tensor:
        """Elementwise OR of a bool tensor over ranks (same shape on every rank)."""
        if self.world == 1:
            return mask
        flat = mask.detach().to("cpu", torch.float32).reshape(-1).clone()
        return (self.all_reduce_sum(flat) > 0).reshape(mask.shape).to(mask.device)

    def max_over_ranks(self, n: int) -> int:
        if self.world == 1:
            return int(n)
        t = torch.tensor([float(n)])
        if dist.is_initialized():
            with self.guard("all_reduce max"):
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def collective(self, what: str):
        """Context for a span of model calls that are collectives under lock-step (FSDP2's
        forwards and backwards): guarded as one (`guard`); a plain context otherwise."""
        return self.guard(what) if self.lockstep else contextlib.nullcontext()

    def barrier(self) -> None:
        if self.world > 1:
            with self.guard("barrier"):
                dist.barrier()

    # ------------------------------------------------------------------ wrapping and gradients
    def wrap(self, module: nn.Module, params: list[nn.Parameter], full: bool,
             frozen: list[nn.Module] | tuple = ()) -> None:
        """Prepare the policy's module for training on `world` ranks (call before building the
        optimizer, and take the trainable parameters *after* it: FSDP2 replaces them by DTensors).

        full=False (LoRA): broadcast the trainable tensors from rank 0.
        full=True: `fully_shard` every block (`shard_units`) and then the module (FSDP2), each
        resharded after forward, sum reduction of the gradients in every backward; `frozen`
        modules (the reference copy) are sharded the same way. Sets `lockstep`: from here on
        every rank must make the same sequence of model calls (`flowpo.lockstep.LockstepPolicy`)."""
        if self.world == 1:
            return
        if not full:
            with self.guard("broadcast initial weights"), torch.no_grad():
                for p in params:
                    dist.broadcast(p.data, src=0)
            return
        from torch.distributed.fsdp import FSDPModule

        with self.guard("fsdp shard module"):
            _shard(module)
            for m in frozen:
                if m is not None:
                    _shard(m)
        for m in module.modules():
            if isinstance(m, FSDPModule):
                m.set_gradient_divide_factor(1.0)       # sum, not mean (global normaliser)
                m.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
        self.fsdp = module
        self.lockstep = True

    def sync_gradients(self, params: list[nn.Parameter]) -> None:
        """Make every rank's gradients the sum over ranks (see module docstring). Under FSDP2 every
        backward already reduce-scattered (summed) its gradients into the shards: nothing left to do."""
        if self.world == 1 or self.fsdp is not None:
            return
        for p in params:  # a rank without rows in this minibatch still takes part, with zeros
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        with self.guard(f"all_reduce grads {flat.numel()}"):
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        off = 0
        for p in params:
            p.grad.copy_(flat[off:off + p.grad.numel()].view_as(p.grad))
            off += p.grad.numel()

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> float:
        """clip_grad_norm_ that also works on FSDP2's DTensor gradients; returns the global norm."""
        with self.guard("grad norm") if self.fsdp is not None else contextlib.nullcontext():
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            return float(norm.full_tensor() if _is_dtensor(norm) else norm)

    # ------------------------------------------------------------------ checkpoint tensors
    def full(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Full (unsharded) copies of DTensors; plain tensors pass through. Collective under FSDP2:
        every rank must call it, in the same order."""
        if not any(_is_dtensor(v) for v in tensors.values()):
            return tensors
        out = {}
        with self.guard("fsdp gather checkpoint"):
            for k, v in tensors.items():
                out[k] = v.full_tensor().detach().clone() if _is_dtensor(v) else v
        return out

    def like(self, full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """`full` sharded as `ref` when ref is a DTensor of the same global shape, else `full`."""
        if _is_dtensor(full) or not _is_dtensor(ref) or tuple(full.shape) != tuple(ref.shape):
            return full  # (a DTensor is already a shard: the sharded resume reads its rows itself)
        from torch.distributed.tensor import distribute_tensor

        with self.guard("fsdp shard checkpoint"):
            return distribute_tensor(full.to(ref.dtype), ref.device_mesh, ref.placements)


# ---------------------------------------------------------------------- FSDP2 units and lock-step
# diffusers' block lists (Z-Image: the main `layers` and its noise / caption refiners)
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "blocks", "layers", "noise_refiner",
               "context_refiner")


def shard_units(module: nn.Module) -> list[nn.Module]:
    """The blocks FSDP2 shards one by one (each all-gathered only while it runs): the module's own
    `fsdp_units()` where it has one (Wan2.2's two experts: both experts' blocks), else the elements of
    the module's block lists (diffusers transformers: `transformer_blocks`, FLUX's
    `single_transformer_blocks`, Wan's `blocks`, Z-Image's `layers` and refiners), else its direct
    children that are themselves containers of parameterised layers (the embedded FlowNet's residual blocks). What is left
    (embedders, final layers) belongs to the root unit."""
    own = getattr(module, "fsdp_units", None)  # a policy module of several networks (Wan2.2's ExpertPair)
    if callable(own):
        return list(own())
    units = [b for name in BLOCK_LISTS if isinstance(getattr(module, name, None), nn.ModuleList)
             for b in getattr(module, name)]
    if units:
        return units
    return [c for c in module.children()
            if any(True for _ in c.children()) and any(True for _ in c.parameters())]


def _shard(module: nn.Module) -> None:
    from torch.distributed.fsdp import fully_shard

    for unit in shard_units(module):
        fully_shard(unit, reshard_after_forward=True)
    # explicit True: FSDP2's default keeps the root gathered after forward
    fully_shard(module, reshard_after_forward=True)
