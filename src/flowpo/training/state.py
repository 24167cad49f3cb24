"""What a run's checkpoint holds, and how a Trainer is saved and restored (`flowpo train --resume`).

Every rank takes part in both: under FSDP2 the optimizer and EMA shards are gathered to full
tensors for rank 0 to write (`checkpoint.save`, atomic), and on resume every rank loads the same
checkpoint and re-shards it. The file format is `flowpo.training.checkpoint`'s.
"""
from __future__ import annotations

from pathlib import Path

import torch

from flowpo.training import checkpoint
from flowpo.training.runlog import truncate_metrics


def save(tr) -> None:
    """Checkpoint a Trainer `tr` (weights/adapter, optimizer, EMA, plan, replay buffer, RNG)."""
    # every rank takes part (FSDP2 gathers the optimizer/EMA shards); rank 0 writes; all wait for it.
    # Under FSDP2 the module holds its gathered full weights here, so trainable_state_dict is full.
    opt_t, opt_s = checkpoint.optimizer_to_flat(tr.opt)
    opt_t = tr.dist.full(opt_t)
    ema = tr.dist.full({str(i): t for i, t in enumerate(tr.ema.shadow)}) if tr.ema is not None else None
    objective = tr.dist.full(tr.parts.objective.state_dict())  # the objective's old-policy copy, if any
    if not tr.dist.is_main:
        tr.dist.barrier()
        return
    tensors = {"trainable": tr.policy.trainable_state_dict(), "optimizer": opt_t}
    state = {"iteration": tr.iteration, "nfe": tr.nfe, "wall_s": tr.wall(), "optimizer": opt_s,
             "plan": tr.plan.state_dict(), "torch_rng": torch.get_rng_state().tolist(),
             "seed": tr.cfg.train.seed}
    if ema is not None:
        tensors["ema"] = ema
    replay = tr.parts.replay.state_dict()
    if replay is not None:
        tensors["buffer"], state["buffer"] = replay
    if objective:
        tensors["objective"] = objective
    checkpoint.save(tr.out, tr.iteration, tensors=tensors, state=state, keep=tr.cfg.train.keep_checkpoints)
    tr.dist.barrier()


def restore(tr) -> None:
    """Load the newest complete checkpoint of `tr.out` into the Trainer `tr`."""
    # every rank loads the same checkpoint (the run folder must be visible to all of them)
    path = checkpoint.latest(tr.out)
    found = tr.dist.all_gather_objects(None if path is None else path.name)
    if path is None or len(set(found)) > 1:
        raise FileNotFoundError(f"--resume: no complete checkpoint under {tr.out}/checkpoints, or ranks "
                                f"see different ones ({found}); start a new run without --resume, or put "
                                "the run folder on a file system every node shares")
    tensors, state = checkpoint.load(path)
    tr.dist.shard_params()  # FSDP2: write full tensors into the DTensor shards
    like = tr.dist.like
    if tr.dist.fsdp is not None:
        tmpl = tr.policy.trainable_state_dict()
        tensors["trainable"] = {k: like(v, tmpl[k]) for k, v in tensors["trainable"].items()}
        tensors["optimizer"] = {k: like(v, tr.params[int(k.split(".")[0])])
                                for k, v in tensors.get("optimizer", {}).items()}
    tr.policy.load_trainable_state_dict(tensors["trainable"])
    checkpoint.optimizer_from_flat(tr.opt, tensors.get("optimizer", {}), state["optimizer"])
    if tr.ema is not None and "ema" in tensors:
        for i, sh in enumerate(tr.ema.shadow):
            sh.copy_(like(tensors["ema"][str(i)], sh))
    if "buffer" in state:
        tr.parts.replay.load_state_dict(tensors.get("buffer", {}), state["buffer"])
    if "objective" in tensors:
        tmpl = tr.parts.objective.state_dict()
        tr.parts.objective.load_state_dict({k: like(v, tmpl[k]) for k, v in tensors["objective"].items()})
    tr.plan.load_state_dict(state["plan"])
    torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
    tr.iteration, tr.nfe, tr.wall_offset = state["iteration"], state["nfe"], state["wall_s"]
    # drop metric lines written after the checkpoint (a run killed mid-way) so the log stays consistent
    if tr.dist.is_main:
        truncate_metrics(tr.out / "metrics.jsonl", tr.iteration)


def load_policy(cfg, run: str | Path | None):
    """The policy of `cfg` with the newest checkpoint of run folder `run` loaded (its EMA weights
    when the run kept an EMA: what the run evaluated), without building a trainer. run=None: the
    base weights. Returns (policy, iteration)."""
    from flowpo.parts import build_policy

    policy = build_policy(cfg.model)
    if run is None:
        return policy, 0
    path = checkpoint.latest(run)
    if path is None:
        raise FileNotFoundError(f"--run {run}: no complete checkpoint under {run}/checkpoints; give the --out "
                                "folder of a training run that saved one")
    tensors, state = checkpoint.load(path)
    policy.load_trainable_state_dict(tensors["trainable"])
    if "ema" in tensors:
        params = policy.trainable_parameters()
        with torch.no_grad():
            for i, p in enumerate(params):
                p.copy_(tensors["ema"][str(i)].to(p.device, p.dtype))
    return policy, int(state["iteration"])
