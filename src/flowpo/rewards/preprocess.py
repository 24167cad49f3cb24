"""Batched image preprocessing for the model scorers, on tensors, on the scorer's device.

The reference processors (CLIPImageProcessor, BLIP's and open_clip's torchvision transforms)
take PIL images: uint8 → resize (PIL bicubic) → crop or pad → uint8 → float → normalise. Here the
same steps run on a float batch [N, 3, H, W] in [0, 1] with no PIL round-trip:

    quantise  x ← round(255·x)/255            (the uint8 image the peers score; option)
    resize    torch bicubic with antialias     (PIL's filter: a = −0.5, support scaled on downsampling),
              in PIL's two passes, each clipped and rounded to uint8 levels (with quantise)
    crop      centre crop to size × size       (CLIP: floor offsets; BLIP: torchvision's rounding), or
    pad       resize the longest side to size and zero-pad to a centred square (HPSv2)
    normalise (x − mean) / std per channel

What differs from the PIL path is the rounding PIL applies after the resize (uint8 storage); the
tests measure the gap against the real processors (tests/test_reward_models.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def as_rgb(images: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] with C ∈ {1, 3, 4} → [N, 3, H, W] fp32 in [0, 1] (grey repeated, alpha dropped)."""
    if images.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
    c = images.shape[1]
    if c == 1:
        images = images.expand(-1, 3, -1, -1)
    elif c == 4:
        images = images[:, :3]
    elif c != 3:
        raise ValueError(f"images must have 1, 3 or 4 channels, got {c}")
    return images.float().clamp(0, 1)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] → uint8 0..255 as PIL/diffusers store them: round(255·clamp(x))."""
    return torch.round(images.detach().float().clamp(0, 1) * 255).to(torch.uint8)


def _levels(z: torch.Tensor) -> torch.Tensor:
    return torch.round(z.clamp(0, 1) * 255) / 255


def _resize(x: torch.Tensor, h: int, w: int, quantize: bool = True) -> torch.Tensor:
    """Bicubic with antialias (PIL's filter). quantize=True: as PIL resizes a uint8 image, a
    horizontal pass then a vertical one, each clipped and rounded to the 256 levels (a one-pass
    float resize differs by up to ~26 levels on noisy images: the overshoot PIL clips between the
    passes). quantize=False: one float pass."""
    if x.shape[-2:] == (h, w):
        return x
    if not quantize:
        return F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
    if w != x.shape[-1]:
        x = _levels(F.interpolate(x, size=(x.shape[-2], w), mode="bicubic", antialias=True, align_corners=False))
    if h != x.shape[-2]:
        x = _levels(F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False))
    return x


def resize_shortest(x: torch.Tensor, size: int, quantize: bool = True) -> torch.Tensor:
    """Shortest side → `size`, aspect kept (the long side truncated as the HF processors and
    torchvision's Resize(int) do)."""
    h, w = x.shape[-2:]
    if h <= w:
        return _resize(x, size, int(size * w / h), quantize)
    return _resize(x, int(size * h / w), size, quantize)


def center_crop(x: torch.Tensor, size: int, offset: str = "floor") -> torch.Tensor:
    """Centre crop to size × size, zero-padding first if smaller. offset: "floor" puts the window
    at ⌊(H − size)/2⌋ (transformers' processors), "round" at round((H − size)/2), half to even
    (torchvision's CenterCrop: BLIP/ImageReward)."""
    h, w = x.shape[-2:]
    if h < size or w < size:
        ph, pw = max(0, size - h), max(0, size - w)
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        h, w = x.shape[-2:]
    if offset == "round":
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    else:
        top, left = (h - size) // 2, (w - size) // 2
    return x[..., top:top + size, left:left + size]


def resize_longest_pad(x: torch.Tensor, size: int, quantize: bool = True) -> torch.Tensor:
    """Longest side → `size` (aspect kept), then zero-pad to a centred size × size square
    (open_clip's `resize_longest_max`, which HPSv2 uses: no part of the image is cropped)."""
    h, w = x.shape[-2:]
    scale = size / max(h, w)
    nh, nw = round(h * scale), round(w * scale)
    x = _resize(x, nh, nw, quantize)
    ph, pw = size - nh, size - nw
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


def to_pixels(images: torch.Tensor, size: int, *, mode: str = "crop", crop: int | None = None,
              offset: str = "floor", mean=OPENAI_MEAN, std=OPENAI_STD, quantize: bool = True, device=None,
              dtype=torch.float32) -> torch.Tensor:
    """[N, C, H, W] in [0, 1] → normalised pixel values [N, 3, S, S] on `device` in `dtype`.

    mode: "crop" (shortest side → size, centre crop to `crop`, default size; S = crop) or "pad"
    (longest side → size, zero pad; S = size). offset: the crop's rounding (center_crop).
    """
    x = as_rgb(images.to(device) if device is not None else images)
    if quantize:
        x = torch.round(x * 255) / 255
    if mode == "crop":
        x = center_crop(resize_shortest(x, size, quantize), crop or size, offset)
    elif mode == "pad":
        x = resize_longest_pad(x, size, quantize)
    else:
        raise ValueError(f"mode must be 'crop' or 'pad', got {mode!r}")
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return ((x - m) / s).to(dtype)


def _side(v, keys=("shortest_edge", "height")) -> int | None:
    """An int side from a size spec: an int, a dict, or transformers' SizeDict."""
    if v is None or isinstance(v, int):
        return v
    for k in keys:
        got = v.get(k) if isinstance(v, dict) else getattr(v, k, None)
        if got:
            return int(got)
    return None


def processor_geometry(image_processor) -> tuple[int, int | None, tuple, tuple]:
    """(resize size of the shortest side, centre-crop size or None, mean, std) of a transformers
    image processor (CLIPImageProcessor and kin)."""
    size = _side(image_processor.size)
    crop = _side(getattr(image_processor, "crop_size", None), ("height", "shortest_edge")) \
        if getattr(image_processor, "do_center_crop", False) else None
    if size is None:
        raise ValueError(f"image processor size {image_processor.size!r} has no shortest_edge/height")
    mean = tuple(float(v) for v in (getattr(image_processor, "image_mean", None) or OPENAI_MEAN))
    std = tuple(float(v) for v in (getattr(image_processor, "image_std", None) or OPENAI_STD))
    return size, crop, mean, std
