"""Local loading for the model scorers: paths checked up front, devices and dtypes resolved, state
dicts read safely. Nothing here downloads: every `from_pretrained` runs with
`local_files_only=True`, and pickle checkpoints are read with `weights_only=True` only.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from flowpo.errors import ConfigError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class RewardOptionError(ConfigError):
    """A reward option names a missing file, a bad value, or nothing at all (exit code 2)."""


def device_of(name: str, reward: str = "") -> torch.device:
    """'auto' → cuda:LOCAL_RANK when CUDA is available (each rank scores on its own GPU), else cpu.
    A device this machine does not have is one line naming the option."""
    key = f"reward.options.{reward}.device" if reward else "device"
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise RewardOptionError(f"{key}={name!r} is not a torch device; use auto, cpu or cuda:N") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0 or (dev.index is not None and dev.index >= n):
            raise RewardOptionError(f"{key}={name!r}: this machine has {n} CUDA device(s); use auto, cpu"
                                    + (f" or cuda:0..{n - 1}" if n else ""))
    return dev


def check_heads(reward: str, key: str, width: int, heads: int, hint: str) -> int:
    """An attention head count that divides the checkpoint's width, or one line saying so."""
    if heads < 1 or width % heads:
        raise RewardOptionError(f"reward.options.{reward}.{key}={heads} does not divide the checkpoint's width "
                                f"{width}; {hint}")
    return heads


def dtype_of(reward: str, name: str) -> torch.dtype:
    if name not in DTYPES:
        raise RewardOptionError(f"reward.options.{reward}.dtype={name!r} is unknown; use one of {sorted(DTYPES)}")
    return DTYPES[name]


def need_path(reward: str, key: str, value: str | None, what: str, *, folder: bool) -> Path:
    """The local file or folder option `key` of `reward`, or one line saying what to point it at."""
    hint = f"set reward.options.{reward}.{key}=/path/to/{what} (a local {'folder' if folder else 'file'}; " \
           "flowpo never downloads weights)"
    if not value:
        raise RewardOptionError(f"reward {reward!r} needs option {key!r}: {hint}")
    p = Path(value).expanduser()
    if not p.exists():
        raise RewardOptionError(f"reward.options.{reward}.{key}={value!r} does not exist; {hint}")
    if folder and not p.is_dir():
        raise RewardOptionError(f"reward.options.{reward}.{key}={value!r} is a file, not a folder; {hint}")
    if not folder and not p.is_file():
        raise RewardOptionError(f"reward.options.{reward}.{key}={value!r} is a folder, not a file; {hint}")
    return p


def read_state_dict(reward: str, key: str, path: Path, *, nested: tuple[str, ...] = ("state_dict",)) -> dict:
    """A state dict from .safetensors, or from a torch pickle with weights_only=True (so a
    checkpoint cannot run code). A pickle that holds {nested_key: state_dict} is unwrapped."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - one line naming the file
        raise RewardOptionError(f"reward.options.{reward}.{key}={str(path)!r} cannot be read as a checkpoint "
                                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); give a "
                                ".safetensors file or a torch state dict") from None
    for k in nested:
        if isinstance(sd, dict) and k in sd and isinstance(sd[k], dict):
            sd = sd[k]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise RewardOptionError(f"reward.options.{reward}.{key}={str(path)!r} holds no state dict of tensors")
    return sd


def from_pretrained(cls, reward: str, key: str, path: Path, **kw):
    """`cls.from_pretrained(path, local_files_only=True)`, with one line if the folder is not that."""
    try:
        return cls.from_pretrained(str(path), local_files_only=True, **kw)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RewardOptionError(f"reward.options.{reward}.{key}={str(path)!r}: {cls.__name__} cannot load it "
                                f"({first}); point it at the folder that holds its files (config/tokenizer JSON and weights)") from None


def load_strict(module: torch.nn.Module, state: dict, reward: str, source: str) -> None:
    """load_state_dict(strict=True) with one line naming the first missing/unexpected keys."""
    own = module.state_dict()
    shapes = [k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    if shapes:
        k = shapes[0]
        raise RewardOptionError(f"reward {reward!r}: {source} does not match the model ({k} has shape "
                                f"{tuple(state[k].shape)}, the model expects {tuple(own[k].shape)}); is it the "
                                "right checkpoint for this reward?")
    res = module.load_state_dict(state, strict=False)
    if res.missing_keys or res.unexpected_keys:
        raise RewardOptionError(
            f"reward {reward!r}: {source} does not match the model (missing {res.missing_keys[:3]}, unexpected "
            f"{res.unexpected_keys[:3]}{' …' if len(res.missing_keys) + len(res.unexpected_keys) > 6 else ''}); "
            "is it the right checkpoint for this reward?")
