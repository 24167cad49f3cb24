"""Resumable checkpoints, written atomically, safetensors only (no pickle).

Layout: DIR/checkpoints/iter_000010/
    trainable.safetensors   the trainable weights (LoRA tensors or all weights)
    ema.safetensors         EMA of the trainable weights (if enabled)
    optimizer.safetensors   optimizer tensors, keyed "<param index>.<name>"
    buffer.safetensors      replay buffer tensors (if enabled)
    state.json              iteration, nfe, wall time, plan/buffer metadata, RNG, optimizer scalars
    manifest.json           sha256 and size of every file above, written last
Sharded (FSDP2 full fine-tuning on W ranks, `save_sharded`): each rank writes its rows of every
sharded tensor as `<group>.rank00003-of-00008.safetensors` (metadata `flowpo_shards`: the rows
[start, stop) and the global shape of each), tensors that are not sharded go to
`<group>.safetensors` (rank 0), and rank 0 writes state.json and the manifest of all files after
every rank has finished. `load` consolidates either layout into full tensors (one process, the
export); `Reader.rows` reads only a slice, so W' ranks resume from a W-rank checkpoint (any W').
A save writes everything into `iter_XXXXXX.tmp`, fsyncs, then renames it into place: a kill during
a save leaves the previous checkpoint intact and the partial one ignored (and removed next time).
`latest_intact` verifies the manifest (and that every file parses) and falls back to the newest
intact checkpoint, naming each one it skipped and why: a truncated, garbage or bit-flipped file
never loads silently. `load_latest` goes one step further for the readers and resume: a checkpoint
whose bytes match its manifest but whose tensors do not load (a malformed file, non-finite weights,
a shape the caller rejects) is skipped the same way. Only regular files inside the run folder are
opened (a FIFO, a device or a symlink out of the folder is damage, never read), and state.json's
fields are range-checked. A damaged checkpoint that a resumed run saves over is kept aside as
`iter_XXXXXX.damaged` (never loaded, never rotated away).
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import stat
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from flowpo.errors import CheckpointError

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
            _write({k: v.detach().contiguous() for k, v in tdict.items()}, tmp / f"{fname}.safetensors")
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    manifest = {f.name: {"sha256": _sha256(f), "bytes": f.stat().st_size} for f in sorted(tmp.iterdir())}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    for f in tmp.iterdir():
        os.chmod(f, 0o644)  # like the rest of the run folder (safetensors writes 0600)
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    return _publish(ckdir, tmp, final, iteration, keep)


def _write(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """save_file, with a full disk raised as OSError(ENOSPC) naming the file (safetensors reports
    it as a SafetensorError of its own)."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors' own error type for I/O failures
        text = str(e)
        if "code: 28" in text or "StorageFull" in text or "No space left" in text:
            raise OSError(errno.ENOSPC, "No space left on device", str(path)) from None
        raise


def _publish(ckdir: Path, tmp: Path, final: Path, iteration: int, keep: int) -> Path:
    """Rename the finished `tmp` folder into place and rotate (a damaged one there is kept aside)."""
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


def _open_regular(path: Path):
    """A binary reader of `path`, only if it is a regular file (a FIFO is opened non-blocking and
    refused, so it can never hang a reader)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"{path.name} is not a regular file")
    return os.fdopen(fd, "rb")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with _open_regular(path) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_json(path: Path, what: str):
    try:
        with _open_regular(path) as f:
            return json.loads(f.read().decode("utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(f"{what} is not UTF-8 text") from None
    except ValueError as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{what} is not valid JSON ({str(e)[:80]})") from None


_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))


def _not_regular(path: Path, root: Path) -> str | None:
    """Why `path` may not be read as a checkpoint file (None: a regular file inside `root`, the run
    folder, possibly through a symlink that stays inside it)."""
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            target = path.resolve()
            if not target.is_relative_to(root.resolve()):
                return f"{path.name} is a symlink out of the run folder (to {str(target)[:120]})"
            st = os.stat(target)
    except (OSError, RuntimeError) as e:  # a dangling or looping link
        return f"{path.name} cannot be read ({type(e).__name__})"
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a regular file")
        return f"{path.name} is {kind}, not a regular file"
    return None


_STATE_COUNTS = ("iteration", "nfe")


def check_state(state, name: str | None = None) -> str | None:
    """Why a checkpoint's state.json is out of range (None: fine). `iteration` is required (and
    must match the folder name `name` when given); the other fields the trainer writes are checked
    when present: iteration and nfe are non-negative integers, seed a 64-bit one, wall_s a finite number ≥ 0, torch_rng the CPU
    generator's state (bytes), optimizer and plan mappings."""
    if not isinstance(state, dict):
        return "state.json is not a JSON mapping"
    if "iteration" not in state:
        return "state.json has no iteration"
    for key in _STATE_COUNTS:
        if key in state:
            v = state[key]
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2 ** 63:
                return f"state.json {key}={str(v)[:40]} is out of range (a count from 0 to 2**63 - 1)"
    seed = state.get("seed", 0)  # (runs from before seeds were range-checked may hold a negative one)
    if isinstance(seed, bool) or not isinstance(seed, int) or not -2 ** 63 < seed < 2 ** 63:
        return f"state.json seed={str(seed)[:40]} is not a 64-bit integer"
    if name is not None and name.startswith(PREFIX) and name[len(PREFIX):].isdigit() \
            and int(name[len(PREFIX):]) != state["iteration"]:
        return f"state.json iteration={state['iteration']} does not match the folder {name}"
    if "wall_s" in state:
        w = state["wall_s"]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            return f"state.json wall_s={str(w)[:40]} is out of range (seconds >= 0)"
    if "torch_rng" in state:
        rng = state["torch_rng"]
        if not isinstance(rng, list) or len(rng) != _rng_size() or \
                not all(type(b) is int and 0 <= b <= 255 for b in rng):
            return "state.json torch_rng is not a CPU generator state (a list of bytes of the right length)"
    for key in ("optimizer", "plan"):
        if key in state and not isinstance(state[key], dict):
            return f"state.json {key} is not a JSON mapping"
    if isinstance(state.get("optimizer"), dict) and not isinstance(state["optimizer"].get("param_groups"), list):
        return "state.json optimizer has no param_groups list"
    return None


def _rng_size() -> int:
    return int(torch.get_rng_state().numel())


def verify(path: str | Path) -> str | None:
    """None if the checkpoint folder is intact, else why not (one short phrase). Checks the manifest's
    sizes and sha256 sums; a folder without a manifest (written before manifests existed) is
    checked by parsing state.json and every safetensors file instead."""
    try:
        return _verify(Path(path))
    except CheckpointError as e:
        return str(e)
    except OSError as e:  # e.g. removed while being read (a writer's rotation)
        return f"it cannot be read ({type(e).__name__}: {str(e)[:120]})"


def _verify(path: Path) -> str | None:
    root = path.parent.parent  # the run folder
    if path.is_symlink() and not path.resolve().is_relative_to(root.resolve()):
        return "the folder is a symlink out of the run folder"
    mf = path / MANIFEST
    names = ["state.json", *sorted(p.name for p in path.glob("*.safetensors"))]
    if os.path.lexists(mf):
        why = _not_regular(mf, root)
        if why:
            return why
        try:
            manifest = _read_json(mf, MANIFEST)
        except CheckpointError as e:
            return f"{MANIFEST} is unreadable ({e})"
        if not isinstance(manifest, dict) or "state.json" not in manifest or \
                not all(isinstance(r, dict) and {"sha256", "bytes"} <= set(r) for r in manifest.values()):
            return f"{MANIFEST} does not describe this checkpoint"
        for name in sorted(set(manifest) | set(names)):
            f = path / name
            if not os.path.lexists(f):
                return f"{name} is missing"
            why = _not_regular(f, root)
            if why:
                return why
            if name not in manifest:
                return f"{name} is not in the manifest"
            rec = manifest[name]
            if f.stat().st_size != rec["bytes"]:
                return f"{name} has {f.stat().st_size} bytes, the manifest says {rec['bytes']} (truncated?)"
            if _sha256(f) != rec["sha256"]:
                return f"{name} does not match its sha256 in the manifest (corrupted)"
        return check_state(_read_json(path / "state.json", "state.json"), path.name)
    for name in names:
        if not os.path.lexists(path / name):
            return f"{name} is missing"
        why = _not_regular(path / name, root)
        if why:
            return why
    why = check_state(_read_json(path / "state.json", "state.json"), path.name)
    if why:
        return why
    try:
        for name in names[1:]:
            load_file(str(path / name))
    except Exception as e:  # noqa: BLE001 - any parse failure means: not loadable
        return f"it does not parse ({type(e).__name__}: {str(e)[:120]})"
    return None


def latest_intact(root: str | Path) -> tuple[Path | None, list[tuple[str, str]]]:
    """The newest checkpoint that verifies, and [(folder name, reason)] of the newer ones skipped."""
    ckdir = Path(root) / "checkpoints"
    skipped: list[tuple[str, str]] = []
    if not ckdir.exists():
        return None, skipped
    for p in reversed(_finished(ckdir)):
        why = verify(p) if os.path.lexists(p / "state.json") else "state.json is missing"
        if why is None:
            return p, skipped
        skipped.append((p.name, why))
    return None, skipped


def _finished(ckdir: Path) -> list[Path]:
    """The finished checkpoint folders (iter_XXXXXX; never a writer's .tmp or a .damaged one), oldest first."""
    try:
        entries = list(ckdir.iterdir())
    except OSError:
        return []
    return sorted(p for p in entries if p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit() and p.is_dir())


FINITE_GROUPS = ("trainable", "ema", "optimizer", "objective")
"""Tensor groups whose values must be finite (weights and their optimizer state); the replay
buffer may hold NaN (a scorer's missing detail fields)."""


def load_latest(root: str | Path, accept=None) -> tuple[Path | None, tuple | None, list[tuple[str, str]]]:
    """The newest checkpoint that verifies and loads: (path, (tensors, state), skipped), skipped
    [(folder name, reason)] for each newer one passed over. `accept(tensors, state)` may raise
    CheckpointError (e.g. a tensor shape the model does not have) to pass over one more."""
    ckdir = Path(root) / "checkpoints"
    skipped: list[tuple[str, str]] = []
    for p in reversed(_finished(ckdir)):
        why = verify(p) if os.path.lexists(p / "state.json") else "state.json is missing"
        if why is None:
            try:
                loaded = load(p)
                if accept is not None:
                    accept(*loaded)
                return p, loaded, skipped
            except CheckpointError as e:
                why = str(e)
            except OSError as e:  # removed while being read (a writer's rotation)
                why = f"it cannot be read ({type(e).__name__}: {str(e)[:120]})"
        skipped.append((p.name, why))
    return None, None, skipped


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
    done = [p for p in _finished(Path(root) / "checkpoints") if (p / "state.json").exists()]
    return done[-1] if done else None


def load(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Every tensor of a checkpoint, full (sharded ones consolidated), and its state.json. Raises
    CheckpointError naming the file when one does not parse, holds non-finite weights, or
    state.json is out of range."""
    path = Path(path)
    state = _read_json(path / "state.json", "state.json")
    why = check_state(state, path.name)
    if why:
        raise CheckpointError(why)
    try:
        r = Reader(path)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors' parse errors have a type of their own
        raise CheckpointError(f"a tensor file does not parse ({type(e).__name__}: {str(e)[:120]})") from None
    tensors: dict = {}
    for g in r.groups():
        try:
            tensors[g] = {k: r.full(g, k) for k in r.keys(g)}
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{r.files(g)} does not load ({type(e).__name__}: {str(e)[:120]})") from None
        if g in FINITE_GROUPS:
            for k, t in tensors[g].items():
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise CheckpointError(f"{r.files(g)} holds non-finite values (NaN/inf) in {k[:60]}; such "
                                          "weights are never loaded")
    return tensors, state


SHARD_META = "flowpo_shards"


def shard_rows(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [start, stop) of dim 0 that FSDP2's Shard(0) gives `rank` of `world` (torch.chunk:
    ceil(n/W) rows each, the last ranks fewer or none)."""
    size = -(-n // world) if n else 0
    return min(n, rank * size), min(n, (rank + 1) * size)


def _sharded_name(group: str, rank: int, world: int) -> str:
    return f"{group}.rank{rank:05d}-of-{world:05d}.safetensors"


class Reader:
    """Tensors of one checkpoint folder, either layout, read lazily (safetensors slices)."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        self._whole: dict[str, Path] = {}
        self._parts: dict[str, list[tuple[Path, dict]]] = {}   # group -> [(file, {key: [start, stop, *shape]})]
        root = self.path.parent.parent
        for f in sorted(self.path.glob("*.safetensors")):
            why = _not_regular(f, root)
            if why:
                raise CheckpointError(why)
            group, _, rest = f.name[: -len(".safetensors")].partition(".rank")
            if not rest:
                self._whole[group] = f
                continue
            with safe_open(str(f), "pt") as h:
                meta = json.loads((h.metadata() or {}).get(SHARD_META, "{}"))
            self._parts.setdefault(group, []).append((f, meta))

    def files(self, group: str) -> str:
        """The file name(s) holding `group` (for messages)."""
        names = [f.name for f in ([self._whole[group]] if group in self._whole else [])]
        names += [f.name for f, _ in self._parts.get(group, [])]
        return ", ".join(names[:3]) + (" …" if len(names) > 3 else "")

    def groups(self) -> list[str]:
        return sorted(set(self._whole) | set(self._parts))

    def keys(self, group: str) -> list[str]:
        from safetensors import safe_open

        keys = set()
        if group in self._whole:
            with safe_open(str(self._whole[group]), "pt") as h:
                keys |= set(h.keys())
        for _, meta in self._parts.get(group, []):
            keys |= set(meta)
        return sorted(keys)

    def _sharded_shape(self, group: str, key: str) -> tuple[int, ...] | None:
        for _, meta in self._parts.get(group, []):
            if key in meta:
                return tuple(meta[key][2:])
        return None

    def shape(self, group: str, key: str) -> tuple[int, ...]:
        """The global shape of one tensor."""
        from safetensors import safe_open

        s = self._sharded_shape(group, key)
        if s is not None:
            return s
        with safe_open(str(self._whole[group]), "pt") as h:
            return tuple(h.get_slice(key).get_shape())

    def rows(self, group: str, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of dim 0 of one tensor, reading only the overlapping shards."""
        from safetensors import safe_open

        if self._sharded_shape(group, key) is None:
            with safe_open(str(self._whole[group]), "pt") as h:
                return h.get_slice(key)[start:stop].contiguous()
        pieces = []
        for f, meta in self._parts.get(group, []):
            if key not in meta:
                continue
            a, b = meta[key][0], meta[key][1]
            lo, hi = max(a, start), min(b, stop)
            if lo < hi or (start == stop and not pieces):  # (an empty shard: 0 rows, the right dtype)
                lo, hi = (lo, hi) if lo < hi else (a, a)
                with safe_open(str(f), "pt") as h:
                    pieces.append((lo, h.get_slice(key)[lo - a:hi - a].contiguous()))
        if not pieces:
            raise KeyError(f"{group}/{key} rows {start}:{stop} are in no file of {self.path}")
        pieces.sort(key=lambda p: p[0])
        out = torch.cat([p for _, p in pieces])
        if out.shape[0] != stop - start:
            raise KeyError(f"{group}/{key}: the shards of {self.path} cover {out.shape[0]} of rows {start}:{stop}")
        return out

    def full(self, group: str, key: str) -> torch.Tensor:
        shape = self._sharded_shape(group, key)
        if shape is None:
            from safetensors import safe_open

            with safe_open(str(self._whole[group]), "pt") as h:
                return h.get_tensor(key)
        return self.rows(group, key, 0, shape[0]).reshape(shape)


def save_sharded(root: str | Path, iteration: int, *, tensors: dict[str, dict[str, torch.Tensor]], state: dict,
                 keep: int, rank: int, world: int, barrier) -> Path:
    """Every rank: write this rank's rows of the DTensors in `tensors` (rank 0 also the plain
    tensors, state.json and the manifest), atomically as `save`. `barrier()` is the ranks' barrier."""
    ckdir = Path(root) / "checkpoints"
    final = ckdir / _name(iteration)
    tmp = ckdir / (_name(iteration) + ".tmp")
    if rank == 0:
        ckdir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    mine = []
    for group, tdict in tensors.items():
        local, meta, plain = {}, {}, {}
        for k, v in tdict.items():
            if type(v).__name__ == "DTensor":
                rows = v.to_local().detach()
                a, b = shard_rows(v.shape[0], rank, world)
                if rows.shape[0] != b - a:
                    raise RuntimeError(f"{group}/{k}: local shard has {rows.shape[0]} rows, expected {b - a} "
                                       "(not FSDP2's Shard(0))")
                local[k] = rows.cpu().contiguous()
                meta[k] = [a, b, *v.shape]
            else:
                plain[k] = v.detach().cpu().contiguous()
        if local:
            f = tmp / _sharded_name(group, rank, world)
            _write(local, f, metadata={SHARD_META: json.dumps(meta)})
            mine.append(f)
        if plain and rank == 0:
            f = tmp / f"{group}.safetensors"
            _write(plain, f)
            mine.append(f)
    for f in mine:
        os.chmod(f, 0o644)
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    barrier()  # every rank's shards are on disk before the manifest names them
    if rank == 0:
        (tmp / "state.json").write_text(json.dumps({**state, "shards": world}, indent=1))
        manifest = {f.name: {"sha256": _sha256(f), "bytes": f.stat().st_size} for f in sorted(tmp.iterdir())}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        for name in ("state.json", MANIFEST):
            os.chmod(tmp / name, 0o644)
            with open(tmp / name, "rb") as fh:
                os.fsync(fh.fileno())
        _publish(ckdir, tmp, final, iteration, keep)
    barrier()
    return final
