"""Plumbing of the diffusers-backed policies: opening a local pipeline folder (never the hub) with
errors that name the fix, dtypes and autocast, freezing and placing the frozen components, the
default image size, VAE decoding, and `PromptCache` (text-encoder outputs per prompt, bounded).

diffusers, transformers and peft are imported lazily (DESIGN.md: `import flowpo` stays fast).
"""
from __future__ import annotations

import contextlib
import json
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Literal

import torch
from torch import nn

INSTALL_HINT = "pip install flowpo[diffusers]"
_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}
Mode = Literal["lora", "full"]


def require(module: str):
    """Import an optional dependency, or fail with the install command."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"flowpo's diffusers policies need the optional dependency '{module}' ({err}); "
            f"install it with `{INSTALL_HINT}`"
        ) from err


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'fp32' | 'bf16' | 'fp16' (or the torch dtype itself) → torch.dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
    elif dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"model.dtype={dtype!r} is not supported; use one of 'fp32', 'bf16', 'fp16'")


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision for the network's forward pass; a no-op at fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def check_pipeline_folder(path: str | Path, expected_class: str, kind: str) -> Path:
    """Validate a local diffusers pipeline folder before anything tries to load it."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise FileNotFoundError(
            f"model.path={str(path)!r} does not exist; point model.path at a local diffusers folder "
            f"(e.g. one downloaded beforehand with `huggingface-cli download <repo> --local-dir DIR`); "
            "flowpo never downloads weights"
        )
    index = folder / "model_index.json"
    if not folder.is_dir() or not index.is_file():
        raise FileNotFoundError(
            f"model.path={str(path)!r} is not a diffusers pipeline folder; expected model_index.json "
            f"in it (the folder that holds model_index.json, transformer/, vae/, text_encoder/, ...)"
        )
    try:
        meta = json.loads(index.read_text())
    except ValueError as e:
        raise ValueError(f"{index} is not valid JSON ({e}); the folder is damaged: download the pipeline "
                         "again") from None
    found = meta.get("_class_name") if isinstance(meta, dict) else None
    if found is None:
        raise ValueError(f"{index} has no _class_name; it is not a diffusers pipeline index: point model.path "
                         "at the folder of a saved pipeline")
    if found != expected_class:
        raise ValueError(
            f"model.kind={kind!r} expects a {expected_class} folder, but {index} declares {found!r}; "
            "set model.kind to the matching kind or point model.path at the right folder"
        )
    return folder


def load_pipeline(pipeline_class_name: str, path: str | Path, kind: str, dtype: torch.dtype, **components):
    """`<PipelineClass>.from_pretrained(path)` from local files only, weights in `dtype`;
    `components` replace (or, as None, skip) the pipeline's own, e.g. processor=None."""
    folder = check_pipeline_folder(path, pipeline_class_name, kind)
    diffusers = require("diffusers")
    require("transformers")
    pipeline_cls = getattr(diffusers, pipeline_class_name)
    # diffusers 0.42 renamed `torch_dtype` to `dtype` (the old name warns); older ones only know the old.
    major, minor = (int(p) for p in diffusers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (0, 42) else "torch_dtype"
    return pipeline_cls.from_pretrained(str(folder), local_files_only=True, **{dtype_kw: dtype}, **components)


def cast_floating(module: nn.Module, dtype: torch.dtype) -> None:
    """module.to(dtype), skipped when its floating parameters already have it (diffusers warns on
    every `.to(dtype)` of a ModelMixin)."""
    if any(p.is_floating_point() and p.dtype != dtype for p in module.parameters()):
        module.to(dtype)


def freeze_eval(*modules: nn.Module | None) -> None:
    """eval() and requires_grad=False: components built from configs start in train mode."""
    for module in modules:
        if module is not None:
            module.eval()
            module.requires_grad_(False)


def set_gradient_checkpointing(module: nn.Module, enabled: bool) -> None:
    """Toggle diffusers' activation checkpointing on a ModelMixin."""
    if enabled:
        module.enable_gradient_checkpointing()
    else:
        module.disable_gradient_checkpointing()


class PromptCache:
    """Text-encoder outputs per prompt string; at most `capacity` prompts, least recent out.

    `encode(prompts)` receives the prompts not cached yet (unique, in order) and returns a dict of
    tensors with one row per prompt; `get` returns rows for `prompts` (duplicates allowed) stacked.
    """

    def __init__(self, encode: Callable[[list[str]], dict[str, torch.Tensor]], capacity: int = 1024):
        if capacity < 1:
            raise ValueError(f"prompt cache capacity={capacity} must be at least 1")
        self._encode = encode
        self.capacity = capacity
        self._rows: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._rows)

    @torch.no_grad()
    def get(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        if isinstance(prompts, str):
            raise TypeError("encode_prompts takes a list of prompts, not a single string")
        todo = [p for p in dict.fromkeys(prompts) if p not in self._rows]
        for start in range(0, len(todo), self.capacity):  # never evict rows of this call's batch
            chunk = todo[start : start + self.capacity]
            out = self._encode(chunk)
            for i, prompt in enumerate(chunk):
                self._rows[prompt] = {k: v[i].clone() for k, v in out.items()}
        rows = []
        for p in prompts:
            self._rows.move_to_end(p)
            rows.append(self._rows[p])
        result = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        while len(self._rows) > self.capacity:
            self._rows.popitem(last=False)
        return result


def place_frozen(pipe, names: tuple[str, ...], device: torch.device, dtype: torch.dtype) -> None:
    """Move the pipeline's non-trained components (text encoders, VAE) to `device`/`dtype`, frozen."""
    for name in names:
        module = getattr(pipe, name, None)
        if module is not None:
            module.to(device)
            cast_floating(module, dtype)
            freeze_eval(module)


def image_size(pipe, resolution: int | tuple[int, int] | None, multiple: int) -> tuple[int, int]:
    """(height, width) in pixels; None → what the pipeline uses with no height/width given
    (`default_sample_size · vae_scale_factor`). Both must be divisible by `multiple`."""
    if resolution is None:
        side = pipe.default_sample_size * pipe.vae_scale_factor
        height, width = side, side
    elif isinstance(resolution, int):
        height, width = resolution, resolution
    else:
        height, width = (int(r) for r in resolution)
    if height <= 0 or width <= 0 or height % multiple or width % multiple:
        raise ValueError(
            f"model.resolution={resolution!r} gives {height}×{width} px; height and width must be "
            f"positive multiples of {multiple} for this pipeline"
        )
    return height, width


@torch.no_grad()
def vae_decode(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Latents [N, C, h, w] (the transformer's space) → images [N, 3, H, W] fp32 in [0, 1].

    z = latents / scaling_factor + shift_factor is what the VAE decoder expects.
    """
    shift = vae.config.shift_factor or 0.0
    z = latents / vae.config.scaling_factor + shift
    param = next(vae.parameters())
    images = vae.decode(z.to(device=param.device, dtype=param.dtype), return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)
