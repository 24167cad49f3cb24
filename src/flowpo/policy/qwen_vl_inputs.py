"""Qwen2-VL's image inputs without its processor (transformers 5 builds `Qwen2VLProcessor` only
with torchvision, which flowpo never depends on): what `Qwen2VLImageProcessor` (its PIL backend)
computes, on tensors, plus the processor's image-pad expansion of the text.

For each image (an RGB PIL image):
    (h', w') = smart_resize(h, w, factor = patch·merge, min_pixels, max_pixels)
               each side rounded to a multiple of the factor; if the area leaves [min, max], both
               sides rescaled by √(area ratio) (floored above the max, ceiled below the min)
    resize     PIL bicubic to (h', w') on the uint8 image (the PIL backend's `np_resize`)
    rescale    x·(1/255) in float64, then float32; normalise (x − mean)/std per channel
    patchify   [C, h', w'] → [(h'/p)·(w'/p), C·T·p·p], the image repeated over the temporal patch
               T, patches ordered (row block, col block, merge row, merge col), features (C, T, p, p)
    grid_thw   (1, h'/p, w'/p)
and each `<|image_pad|>` of the text becomes (h'/p)·(w'/p)/merge² pad tokens, in image order.
tests/test_qwen_image_edit.py checks `image_inputs` against transformers' Qwen2VLImageProcessor
(PIL) and `expand_image_pads` against Qwen2VLProcessor's own __call__.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_PAD = "<|image_pad|>"


@dataclass(frozen=True)
class VLImageConfig:
    """The fields of a Qwen2-VL `preprocessor_config.json` that shape the image inputs."""

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = 3  # PIL bicubic

    @classmethod
    def from_folder(cls, folder: str | Path) -> "VLImageConfig":
        """Read `<folder>/preprocessor_config.json` (min/max pixels also as size shortest/longest_edge)."""
        raw = json.loads((Path(folder) / "preprocessor_config.json").read_text())
        size = raw.get("size") or {}
        return cls(
            patch_size=int(raw.get("patch_size", 14)), merge_size=int(raw.get("merge_size", 2)),
            temporal_patch_size=int(raw.get("temporal_patch_size", 2)),
            min_pixels=int(raw.get("min_pixels", size.get("shortest_edge", 56 * 56))),
            max_pixels=int(raw.get("max_pixels", size.get("longest_edge", 28 * 28 * 1280))),
            mean=tuple(raw.get("image_mean", OPENAI_CLIP_MEAN)), std=tuple(raw.get("image_std", OPENAI_CLIP_STD)),
            rescale_factor=float(raw.get("rescale_factor", 1 / 255)), resample=int(raw.get("resample", 3)),
        )


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's target size: sides multiples of `factor`, area within [min_pixels, max_pixels]."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"a source image of {width}×{height} px has an aspect ratio above 200, which Qwen2-VL refuses")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = max(factor, math.floor(height / beta / factor) * factor), max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def image_inputs(images: list, cfg: VLImageConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB PIL images → (pixel_values [Σ patches, C·T·p·p] fp32, image_grid_thw [n, 3] int64)."""
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    mean = torch.tensor(cfg.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(cfg.std, dtype=torch.float32).view(-1, 1, 1)
    patches, grids = [], []
    for img in images:
        h, w = smart_resize(img.height, img.width, p * m, cfg.min_pixels, cfg.max_pixels)
        if (h, w) != (img.height, img.width):
            img = img.resize((w, h), resample=cfg.resample)
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)          # [C, h, w] uint8
        x = (x.double() * cfg.rescale_factor).float()
        x = (x - mean) / std
        c, gh, gw = x.shape[0], h // p, w // p
        x = x.reshape(c, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)               # [gh/m, gw/m, m, m, C, p, p]
        x = x[:, :, :, :, :, None].expand(*x.shape[:5], t, p, p)                                  # temporal repeat
        patches.append(x.reshape(gh * gw, c * t * p * p))
        grids.append((1, gh, gw))
    return torch.cat(patches), torch.tensor(grids, dtype=torch.long)


def expand_image_pads(text: str, grid_thw: torch.Tensor, merge_size: int) -> str:
    """Each `<|image_pad|>` of `text`, in order, repeated (t·h·w)/merge² times (one per merged patch)."""
    parts = text.split(IMAGE_PAD)
    if len(parts) - 1 != len(grid_thw):
        raise ValueError(f"{len(parts) - 1} image pads in the text but {len(grid_thw)} images")
    out = parts[0]
    for g, rest in zip(grid_thw.tolist(), parts[1:]):
        out += IMAGE_PAD * (g[0] * g[1] * g[2] // merge_size**2) + rest
    return out
