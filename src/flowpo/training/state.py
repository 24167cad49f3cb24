"""What a run's checkpoint holds, and how a Trainer is saved and restored (`flowpo train --resume`).

Every rank takes part in both: under FSDP2 the optimizer and EMA shards are gathered to full
tensors for rank 0 to write (`checkpoint.save`, atomic), and on resume every rank loads the same
checkpoint and re-shards it. The file format is `flowpo.training.checkpoint`'s.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from flowpo.errors import CheckpointError
from flowpo.training import checkpoint
from flowpo.training.runlog import truncate_metrics


@dataclass
class Progress:
    """The run's counters: iterations done, model evaluations spent, wall seconds of earlier sessions."""

    iteration: int = 0
    nfe: int = 0
    wall_offset: float = 0.0


class TrainState:
    """Everything a checkpoint keeps, in one place: the parts' states (trainable weights, optimizer,
    EMA, plan, replay buffer, the objective's old-policy copy), the counters and torch's RNG.

    `state_dict()` → (tensors: {group: {name: tensor}}, meta: JSON-able dict); every rank calls it
    (FSDP2 gathers the shards), rank 0's is written. `load_state_dict` re-shards on every rank."""

    def __init__(self, parts, progress: Progress, dist, seed: int, wall):
        self.parts, self.progress, self.dist, self.seed, self.wall = parts, progress, dist, seed, wall

    def state_dict(self, gather: bool = True) -> tuple[dict, dict]:
        """gather=False (FSDP2's sharded save): DTensors stay shards, each rank writes its own."""
        P, d = self.parts, self.dist
        full = d.full if gather else (lambda t: t)
        # under FSDP2 the weights, optimizer and EMA state are DTensor shards
        opt_t, opt_s = checkpoint.optimizer_to_flat(P.opt)
        tensors = {"trainable": full(P.policy.trainable_state_dict()), "optimizer": full(opt_t)}
        if P.ema.shadow:
            tensors["ema"] = full({str(i): t for i, t in enumerate(P.ema.shadow)})
        objective = full(P.objective.state_dict())
        if objective:
            tensors["objective"] = objective
        meta = {"iteration": self.progress.iteration, "nfe": self.progress.nfe, "wall_s": self.wall(),
                "optimizer": opt_s, "plan": P.plan.state_dict(), "torch_rng": torch.get_rng_state().tolist(),
                "seed": self.seed}
        replay = P.replay.state_dict()
        if replay is not None:
            tensors["buffer"], meta["buffer"] = replay
        return tensors, meta

    def load_state_dict(self, tensors: dict, meta: dict) -> None:
        """`tensors`: {group: {name: tensor}} full tensors, or, under FSDP2, a checkpoint.Reader
        from which each rank reads only the rows of its own shards (any layout, any former W)."""
        P, d = self.parts, self.dist
        like = d.like
        if d.fsdp is not None:
            tensors = self._local_shards(tensors)
        elif isinstance(tensors, checkpoint.Reader):
            tensors = {g: {k: tensors.full(g, k) for k in tensors.keys(g)} for g in tensors.groups()}
        P.policy.load_trainable_state_dict(tensors["trainable"])
        checkpoint.optimizer_from_flat(P.opt, tensors.get("optimizer", {}), meta["optimizer"])
        if P.ema.shadow and "ema" in tensors:
            for i, sh in enumerate(P.ema.shadow):
                sh.copy_(like(tensors["ema"][str(i)], sh))
        if "buffer" in meta:
            P.replay.load_state_dict(tensors.get("buffer", {}), meta["buffer"])
        if "objective" in tensors:
            tmpl = P.objective.state_dict()
            P.objective.load_state_dict({k: like(v, tmpl[k]) for k, v in tensors["objective"].items()})
        P.plan.load_state_dict(meta["plan"])
        torch.set_rng_state(torch.tensor(meta["torch_rng"], dtype=torch.uint8))
        self.progress.iteration, self.progress.nfe = meta["iteration"], meta["nfe"]
        self.progress.wall_offset = meta["wall_s"]

    def check_loaded(self, tensors: dict, meta: dict) -> None:
        """Raise CheckpointError when a loaded checkpoint does not fit this run: a state field or a
        tensor group it needs is missing, or a tensor's name or shape differs from the live one
        (checked before anything is loaded, so a misfit leaves the run untouched for the next one)."""
        P = self.parts
        missing = [k for k in ("iteration", "nfe", "wall_s", "optimizer", "plan", "torch_rng") if k not in meta]
        if missing:
            raise CheckpointError(f"state.json lacks {', '.join(missing)}")
        _same_shapes("trainable.safetensors", tensors.get("trainable", {}), P.policy.trainable_state_dict())
        if P.ema.shadow and "ema" in tensors:
            _same_shapes("ema.safetensors", tensors["ema"], {str(i): t for i, t in enumerate(P.ema.shadow)})
        params = [p for g in P.opt.param_groups for p in g["params"]]
        groups = meta["optimizer"].get("param_groups", [])
        if len(groups) != len(P.opt.param_groups) or \
                [len(g.get("params", [])) if isinstance(g, dict) else -1 for g in groups] != \
                [len(g["params"]) for g in P.opt.param_groups]:
            raise CheckpointError("state.json optimizer param_groups do not match this run's parameters")
        for key, t in tensors.get("optimizer", {}).items():
            pid, _, _name = key.partition(".")
            if not pid.isdigit() or int(pid) >= len(params):
                raise CheckpointError(f"optimizer.safetensors names parameter {key[:40]}, which this run lacks")
            if t.dim() and tuple(t.shape) != tuple(params[int(pid)].shape):
                raise CheckpointError(f"optimizer.safetensors {key[:40]} has shape {tuple(t.shape)}, the parameter "
                                      f"{tuple(params[int(pid)].shape)}")
        if "objective" in tensors:
            _same_shapes("objective.safetensors", tensors["objective"], P.objective.state_dict())

    def _local_shards(self, reader: "checkpoint.Reader") -> dict:
        """FSDP2 resume: {group: {name: DTensor}} of this rank's rows, shaped like the live state
        (templates: the trainable weights, the parameters for the optimizer state, the EMA and
        objective copies); tensors without a DTensor template are read whole (counters, buffer)."""
        from torch.distributed.tensor import DTensor

        P, d = self.parts, self.dist
        tmpl = {"trainable": P.policy.trainable_state_dict(),
                "ema": {str(i): t for i, t in enumerate(P.ema.shadow)}, "objective": P.objective.state_dict()}
        out: dict = {}
        for group in reader.groups():
            out[group] = {}
            for key in reader.keys(group):
                ref = (P.params[int(key.split(".")[0])] if group == "optimizer" else tmpl.get(group, {}).get(key))
                if ref is None or type(ref).__name__ != "DTensor" or reader.shape(group, key) != tuple(ref.shape):
                    out[group][key] = reader.full(group, key)  # not a shard (AdamW's step, the buffer)
                    continue
                a, b = checkpoint.shard_rows(ref.shape[0], d.rank, d.world)
                local = reader.rows(group, key, a, b).to(ref.device, ref.dtype)
                out[group][key] = DTensor.from_local(local, ref.device_mesh, ref.placements, run_check=False,
                                                     shape=ref.shape, stride=ref.stride())
        return out


def _same_shapes(fname: str, got: dict, want: dict) -> None:
    """CheckpointError unless `got` has exactly `want`'s tensor names, each with its shape."""
    if set(got) != set(want):
        extra, lack = sorted(set(got) - set(want)), sorted(set(want) - set(got))
        raise CheckpointError(f"{fname} does not fit this model: " + "; ".join(
            s for s in (f"unknown tensors {extra[:3]}" if extra else "", f"missing {lack[:3]}" if lack else "") if s))
    for k, t in got.items():
        if tuple(t.shape) != tuple(want[k].shape):
            raise CheckpointError(f"{fname} {k[:60]} has shape {tuple(t.shape)}, the model's is {tuple(want[k].shape)}")


def save(st: TrainState, out: Path, keep: int) -> None:
    """Checkpoint `st` under `out`/checkpoints (every rank takes part; rank 0 writes, atomically)."""
    d = st.dist
    if d.fsdp is not None:  # FSDP2: every rank writes its own shards (no full copy anywhere)
        tensors, meta = st.state_dict(gather=False)
        checkpoint.save_sharded(out, st.progress.iteration, tensors=tensors, state=meta, keep=keep, rank=d.rank,
                                world=d.world, barrier=d.barrier)
        return
    tensors, meta = st.state_dict()
    if d.is_main:
        checkpoint.save(out, st.progress.iteration, tensors=tensors, state=meta, keep=keep)
    d.barrier()


def restore(st: TrainState, out: Path) -> None:
    """Load the newest complete checkpoint of run folder `out` into `st`."""
    # every rank loads the same checkpoint (the run folder must be visible to all of them)
    import sys

    if st.dist.fsdp is not None:  # each rank reads only its rows below
        path, skipped = checkpoint.latest_intact(out)
        loaded = None
    else:  # a checkpoint whose tensors do not load or fit is passed over like a damaged one
        path, loaded, skipped = checkpoint.load_latest(out, accept=st.check_loaded)
    found = st.dist.all_gather_objects(None if path is None else path.name)
    if st.dist.is_main:
        for name, why in skipped:
            print(f"flowpo: --resume: skipping checkpoint {name}: {why}", file=sys.stderr)
    if path is None or len(set(found)) > 1:
        if path is None and skipped:
            raise FileNotFoundError(f"--resume: every checkpoint under {out}/checkpoints is damaged "
                                    f"({skipped[0][0]}: {skipped[0][1]}); nothing was changed: move the folder "
                                    "checkpoints/ away to start the run afresh, or restore it from a copy")
        raise FileNotFoundError(f"--resume: ranks see different checkpoints under {out}/checkpoints ({found}); "
                                "put the run folder on a file system every node shares")
    if st.dist.is_main and skipped:
        for name, _ in skipped:  # kept aside, so rotation never keeps them in place of intact ones
            checkpoint.set_aside(Path(out) / "checkpoints" / name)
        print(f"flowpo: --resume: continuing from {path.name} (the skipped ones are kept as <name>.damaged)",
              file=sys.stderr)
    st.dist.barrier()
    if st.dist.fsdp is not None:  # each rank reads only its rows (the checkpoint's W may differ)
        import json

        st.load_state_dict(checkpoint.Reader(path), json.loads((path / "state.json").read_text()))
    else:
        st.load_state_dict(*loaded)
    # drop metric lines written after the checkpoint (a run killed mid-way) so the log stays consistent
    if st.dist.is_main:
        truncate_metrics(out / "metrics.jsonl", st.progress.iteration)


def load_policy(cfg, run: str | Path | None, ema: bool = True, *, announce: str | None = None):
    """The policy of `cfg` with the newest checkpoint of run folder `run` loaded (its EMA weights
    when the run kept an EMA and `ema`: what the run evaluated), without building a trainer; a
    sharded (FSDP2) checkpoint is consolidated. run=None: the base weights. Returns (policy, iteration).

    A reader: it never takes the run's lock, never changes the folder, and ignores a concurrent
    writer's partial (.tmp) checkpoints. A newer checkpoint that is damaged or does not load (bad
    bytes, a FIFO or a symlink out of the folder, non-finite weights, the wrong shapes) is passed
    over; `announce` (the option that named the run, e.g. "--run") says on stderr, in one line,
    which checkpoint is used and why newer ones were skipped."""
    import sys

    from flowpo.parts import build_policy

    policy = build_policy(cfg.model)
    if run is None:
        return policy, 0
    want = policy.trainable_state_dict()
    shapes = [tuple(p.shape) for p in policy.trainable_parameters()]

    def fits(tensors, _state):
        _same_shapes("trainable.safetensors", tensors.get("trainable", {}), want)
        if "ema" in tensors and ema:
            _same_shapes("ema.safetensors", tensors["ema"], {str(i): torch.empty(s) for i, s in enumerate(shapes)})

    path, loaded, skipped = checkpoint.load_latest(run, accept=fits)
    why = "; ".join(f"{name}: {reason}" for name, reason in skipped[:3]) + (" …" if len(skipped) > 3 else "")
    if path is None:
        raise FileNotFoundError(f"{announce or '--run'} {run}: no intact checkpoint under {run}/checkpoints"
                                + (f" (skipped {why})" if skipped else "")
                                + "; give the --out folder of a training run that saved one")
    if announce:
        print(f"flowpo: {announce} {run}: using checkpoint {path.name}"
              + (f" (skipped newer {why})" if skipped else " (the newest)"), file=sys.stderr)
    tensors, state = loaded
    policy.load_trainable_state_dict(tensors["trainable"])
    if "ema" in tensors and ema:
        params = policy.trainable_parameters()
        with torch.no_grad():
            for i, p in enumerate(params):
                p.copy_(tensors["ema"][str(i)].to(p.device, p.dtype))
    return policy, int(state["iteration"])


def export(cfg, run: str | Path, directory: str | Path, ema: bool = True) -> int:
    """`flowpo export`: the newest checkpoint of `run` (a sharded one consolidated, in one
    process) written by the policy's own save path into `directory` (for a diffusers model in full
    mode, `directory/transformer` is what `<Transformer>.from_pretrained` loads). Written into a
    uniquely named temporary folder beside it (tempfile.mkdtemp) and renamed, so a killed export
    leaves nothing half-written under the target's name, and nothing this export did not create is
    ever removed. Returns the iteration."""
    import shutil
    import tempfile

    directory = Path(directory)
    if os.path.lexists(directory):
        raise FileExistsError(f"--out {directory} exists; give a new folder")
    policy, iteration = load_policy(cfg, run, ema=ema, announce="--run")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".export-tmp", dir=directory.parent))
    try:
        policy.save_pretrained(str(tmp))
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; an exported model folder is like any other
        if os.path.lexists(directory):  # appeared meanwhile: never replace it
            raise FileExistsError(f"--out {directory} appeared while exporting; give a new folder")
        os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # ours (mkdtemp made it), nothing else
        raise
    return iteration


def has_any_checkpoint(out: str | Path) -> bool:
    """Whether a run folder holds any finished checkpoint folder, intact or not (a damaged one is
    never removed: `restore` then names it and stops)."""
    ckdir = Path(out) / "checkpoints"
    return ckdir.is_dir() and any(p.is_dir() and p.name.startswith(checkpoint.PREFIX) and "." not in p.name
                                  for p in ckdir.iterdir())


def clear_run(out: str | Path) -> None:
    """Remove what a run killed before its first checkpoint left (logs, samples, partial checkpoints),
    so the folder can hold a fresh start of the same run."""
    import shutil

    out = Path(out)
    for name in ("metrics.jsonl", "report.md"):
        (out / name).unlink(missing_ok=True)
    for name in ("tb", "samples"):
        shutil.rmtree(out / name, ignore_errors=True)
    ckdir = out / "checkpoints"
    if ckdir.is_dir():  # only partial saves (.tmp) can be here: has_any_checkpoint was False
        for p in ckdir.iterdir():
            if p.name.endswith(".tmp"):
                shutil.rmtree(p, ignore_errors=True)


def open_run(st: TrainState, out: Path, resume: bool) -> bool:
    """Make the run folder `out` ready for a run, on every rank: with `resume`, restore the latest
    intact checkpoint (a run killed before its first checkpoint starts afresh there, said once);
    without, refuse a folder that already holds a run. Returns whether the run resumed."""
    dist = st.dist
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    seen = dist.all_gather_objects(has_any_checkpoint(out)) if resume else []
    if resume and len(set(seen)) > 1:
        raise FileNotFoundError(f"--resume: ranks {[r for r, x in enumerate(seen) if not x]} see no checkpoint under "
                                f"{out}/checkpoints while others do; put the run folder on a file system "
                                "every node shares (nothing was changed)")
    if resume and not any(seen):
        if dist.is_main:  # killed before its first checkpoint: not a dead end, start it afresh
            print(f"flowpo: --resume: {out} has no intact checkpoint yet; starting the run afresh there",
                  file=sys.stderr)
            clear_run(out)
        dist.barrier()
        resume = False
    if resume:
        restore(st, out)
    elif not dist.all_true(not (dist.is_main and (out / "metrics.jsonl").exists())):
        raise FileExistsError(f"{out} already holds a run (metrics.jsonl); use --resume to continue it "
                              "or choose another --out")
    return resume
