"""Resumable checkpoints, written atomically, safetensors only (no pickle).

Layout: DIR/checkpoints/iter_000010/
    trainable.safetensors   the trainable weights (LoRA tensors or all weights)
    ema.safetensors         EMA of the trainable weights (if enabled)
    optimizer.safetensors   optimizer tensors, keyed "<param index>.<name>"
    buffer.safetensors      replay buffer tensors (if enabled)
    state.json              iteration, nfe, wall time, plan/buffer metadata, RNG, optimizer scalars
A save writes everything into `iter_XXXXXX.tmp`, fsyncs, then renames it into place: a kill during
a save leaves the previous checkpoint intact and the partial one ignored (and removed next time).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PREFIX = "iter_"


def _name(iteration: int) -> str:
    return f"{PREFIX}{iteration:06d}"


def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict = {"param_groups": sd["param_groups"], "state": {}}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().clone().contiguous()
            else:
                scalars["state"].setdefault(str(pid), {})[k] = v
    return tensors, scalars


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], scalars: dict) -> None:
    state: dict = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    for pid, st in scalars.get("state", {}).items():
        state.setdefault(int(pid), {}).update(st)
    opt.load_state_dict({"state": state, "param_groups": scalars["param_groups"]})


def save(root: str | Path, iteration: int, *, tensors: dict[str, dict[str, torch.Tensor]], state: dict,
         keep: int = 2) -> Path:
    """Write one checkpoint atomically; keep the newest `keep` ones."""
    ckdir = Path(root) / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    final = ckdir / _name(iteration)
    tmp = ckdir / (_name(iteration) + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for fname, tdict in tensors.items():
        if tdict:
            save_file({k: v.detach().contiguous() for k, v in tdict.items()}, str(tmp / f"{fname}.safetensors"))
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    done = sorted(p for p in ckdir.iterdir() if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint folder, or None. Partial (.tmp) folders are ignored."""
    ckdir = Path(root) / "checkpoints"
    if not ckdir.exists():
        return None
    done = sorted(p for p in ckdir.iterdir()
                  if p.is_dir() and p.name.startswith(PREFIX) and not p.name.endswith(".tmp")
                  and (p / "state.json").exists())
    return done[-1] if done else None


def load(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    path = Path(path)
    tensors = {f.stem: load_file(str(f)) for f in path.glob("*.safetensors")}
    state = json.loads((path / "state.json").read_text())
    return tensors, state
