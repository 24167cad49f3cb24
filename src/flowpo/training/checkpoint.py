"""Resumable checkpoints, written atomically, safetensors only (no pickle).

Layout: DIR/checkpoints/iter_000010/
    trainable.safetensors   the trainable weights (LoRA tensors or all weights)
    ema.safetensors         EMA of the trainable weights (if enabled)
    optimizer.safetensors   optimizer tensors, keyed "<param index>.<name>"
    buffer.safetensors      replay buffer tensors (if enabled)
    state.json              iteration, nfe, wall time, plan/buffer metadata, RNG, optimizer scalars
    manifest.json           sha256 and size of every file above, written last
A save writes everything into `iter_XXXXXX.tmp`, fsyncs, then renames it into place: a kill during
a save leaves the previous checkpoint intact and the partial one ignored (and removed next time).
`latest_intact` verifies the manifest (and that every file parses) and falls back to the newest
intact checkpoint, naming each one it skipped and why: a truncated, garbage or bit-flipped file
never loads silently. A damaged checkpoint that a resumed run saves over is kept aside as
`iter_XXXXXX.damaged` (never loaded, never rotated away).
"""
from __future__ import annotations

import hashlib
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
    manifest = {f.name: {"sha256": _sha256(f), "bytes": f.stat().st_size} for f in sorted(tmp.iterdir())}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    for f in tmp.iterdir():
        os.chmod(f, 0o644)  # like the rest of the run folder (safetensors writes 0600)
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        if verify(final) is None:
            shutil.rmtree(final)
        else:  # a damaged checkpoint a resumed run is replacing: kept aside, never loaded or rotated
            damaged = final.with_name(final.name + ".damaged")
            if damaged.exists():
                shutil.rmtree(damaged)
            os.replace(final, damaged)
    os.replace(tmp, final)
    # rotate among the checkpoints up to this one (a newer one, from before a resume, is never the
    # reason the one just written goes)
    done = sorted(p for p in ckdir.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and "." not in p.name
                  and int(p.name[len(PREFIX):]) <= iteration)
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(path: str | Path) -> str | None:
    """None if the checkpoint folder is intact, else why not (one short phrase). Checks the manifest's
    sizes and sha256 sums; a folder without a manifest (written before manifests existed) is
    checked by parsing state.json and every safetensors file instead."""
    path = Path(path)
    mf = path / MANIFEST
    if mf.exists():
        try:
            manifest = json.loads(mf.read_text())
        except (OSError, ValueError) as e:
            return f"{MANIFEST} is unreadable ({e})"
        if not isinstance(manifest, dict) or "state.json" not in manifest or \
                not all(isinstance(r, dict) and {"sha256", "bytes"} <= set(r) for r in manifest.values()):
            return f"{MANIFEST} does not describe this checkpoint"
        for name, rec in manifest.items():
            f = path / name
            if not f.exists():
                return f"{name} is missing"
            if f.stat().st_size != rec["bytes"]:
                return f"{name} has {f.stat().st_size} bytes, the manifest says {rec['bytes']} (truncated?)"
            if _sha256(f) != rec["sha256"]:
                return f"{name} does not match its sha256 in the manifest (corrupted)"
        return None  # the bytes are those written: no need to parse them twice (load will)
    try:
        json.loads((path / "state.json").read_text())
        for f in path.glob("*.safetensors"):
            load_file(str(f))
    except Exception as e:  # noqa: BLE001 - any parse failure means: not loadable
        return f"it does not parse ({type(e).__name__}: {str(e)[:120]})"
    return None


def latest_intact(root: str | Path) -> tuple[Path | None, list[tuple[str, str]]]:
    """The newest checkpoint that verifies, and [(folder name, reason)] of the newer ones skipped."""
    ckdir = Path(root) / "checkpoints"
    skipped: list[tuple[str, str]] = []
    if not ckdir.exists():
        return None, skipped
    done = sorted(p for p in ckdir.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and "." not in p.name)
    for p in reversed(done):
        why = verify(p) if (p / "state.json").exists() else "state.json is missing"
        if why is None:
            return p, skipped
        skipped.append((p.name, why))
    return None, skipped


def set_aside(path: str | Path) -> Path:
    """Rename a damaged checkpoint folder to `<name>.damaged` (kept, never loaded, never rotated)."""
    path = Path(path)
    dest = path.with_name(path.name + ".damaged")
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(path, dest)
    return dest


def latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint folder, or None. Partial (.tmp) folders are ignored."""
    ckdir = Path(root) / "checkpoints"
    if not ckdir.exists():
        return None
    done = sorted(p for p in ckdir.iterdir()
                  if p.is_dir() and p.name.startswith(PREFIX) and "." not in p.name and (p / "state.json").exists())
    return done[-1] if done else None


def load(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    path = Path(path)
    tensors = {f.stem: load_file(str(f)) for f in path.glob("*.safetensors")}
    state = json.loads((path / "state.json").read_text())
    return tensors, state
