"""Reward scorers for the embedded digit model: fn(images [N, C, H, W] in [0, 1], prompts) → [N] fp32.

- `digit_alignment`: p_clf(prompted digit | image), the shipped classifier's softmax probability.
- `jpeg_compressibility` / `jpeg_incompressibility`: ∓ JPEG size in kB (DDPO, Black et al.
  arXiv 2305.13301 §6.1), at quality 95 via Pillow. Images under 32 px are first upsampled by an
  integer factor with nearest neighbour (16×16 → 32×32), so the encoder sees 16 8×8 blocks whose
  content is the image's structure rather than one or four blocks dominated by the header.
- `stroke_quality`: a smooth preference-like score the base was never trained for (below).
- `digit_bold`: binary success, the prompted digit drawn in bold strokes (sparse: ~10% at base).
- `digit_heavy`: dense, the prompted digit's probability times a one-sided penalty on thin strokes
  (far from the base: 0.03 at base, 1 needs strokes bolder than any base sample).

Scores are computed without gradients and returned detached. Colour images are averaged to grey.
"""
from __future__ import annotations

import io
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from flowpo.embedded.prompts import prompt_digit

ASSETS = Path(__file__).resolve().parent / "assets"


def _grey16(images: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] in [0, 1] → grey [N, 1, 16, 16] (channel mean, area/bilinear resize)."""
    if images.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
    g = images.float().mean(1, keepdim=True)
    if g.shape[-2:] != (16, 16):
        g = F.interpolate(g, size=(16, 16), mode="area")
    return g.clamp(0, 1)


@lru_cache(maxsize=1)
def _classifier():
    from safetensors.torch import load_file

    from flowpo.embedded.classifier import DigitClassifier

    path = ASSETS / "classifier.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"classifier weights not found at {path}; run `flowpo pretrain`")
    clf = DigitClassifier()
    clf.load_state_dict(load_file(str(path)))
    return clf.eval().requires_grad_(False)


@torch.no_grad()
def digit_alignment(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """r = softmax(classifier(x))[d(prompt)] ∈ [0, 1]: [N]."""
    labels = torch.tensor([prompt_digit(p) for p in prompts], device=images.device)  # [N]
    probs = _classifier().to(images.device)(_grey16(images)).softmax(-1)  # [N, 10]
    return probs.gather(1, labels[:, None])[:, 0].float().cpu()


def _jpeg_kb(images: torch.Tensor) -> torch.Tensor:
    from PIL import Image

    x = images.detach().float().clamp(0, 1).cpu()
    h, w = x.shape[-2:]
    if min(h, w) < 32:
        k = -(-32 // min(h, w))  # integer ceil(32 / min(H, W))
        x = F.interpolate(x, scale_factor=float(k), mode="nearest")
    arr = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # [N, H, W, C]
    sizes = []
    for a in arr:
        img = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else np.ascontiguousarray(a[..., :3]))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=95)
        sizes.append(buf.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)  # [N] kB


def jpeg_compressibility(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """r = −(JPEG size in kB at quality 95): [N]."""
    return -_jpeg_kb(images)


def jpeg_incompressibility(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """r = +(JPEG size in kB at quality 95): [N]."""
    return _jpeg_kb(images)


@torch.no_grad()
def stroke_quality(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """r = crisp · centre · thick ∈ [0, 1] on the grey 16×16 image p ∈ [0, 1]^(16×16):

        crisp  = mean_ij (2p − 1)²                         (clean black/white, not grey blur)
        centre = exp(−‖μ‖² / (2·0.25²)),  μ = Σ p·u / (Σ p + 10⁻⁶), u ∈ [−1, 1]² pixel coords
        thick  = exp(−(mean p − 0.25)² / (2·0.08²))          (ink fraction near 0.25: moderate strokes)

    Every factor is smooth in p. The product keeps degenerate images low (a blank image is crisp and
    "centred" but has thick ≈ 0.008). Real training digits average ink fraction ≈ 0.31, so slightly
    thinner, cleaner strokes than the data score higher.
    """
    p = _grey16(images)[:, 0]  # [N, 16, 16]
    crisp = (2 * p - 1).pow(2).mean((1, 2))  # [N]
    u = torch.linspace(-1, 1, 16, device=p.device)
    mass = p.sum((1, 2)) + 1e-6  # [N]
    mu_y = (p.sum(2) * u).sum(1) / mass
    mu_x = (p.sum(1) * u).sum(1) / mass
    centre = torch.exp(-(mu_x ** 2 + mu_y ** 2) / (2 * 0.25 ** 2))
    thick = torch.exp(-(p.mean((1, 2)) - 0.25) ** 2 / (2 * 0.08 ** 2))
    return (crisp * centre * thick).float().cpu()


@torch.no_grad()
def digit_bold(images: torch.Tensor, prompts: list[str], ink: float = 0.355) -> torch.Tensor:
    """A sparse, GenEval-like success reward ∈ {0, 1}: 1 when the classifier's most likely digit is
    the prompted one AND the strokes are bold (ink fraction mean p ≥ `ink` on the grey 16×16 image).

    The base model draws the prompted digit 76% of the time at CFG 1 but bold strokes rarely: with
    the default threshold 0.355, 12.5% of the bench's 80 held-out evaluation samples succeed and
    6.1% of 800 others (BENCHMARKS.md §3), so many groups of 8 have no success at all and give GRPO
    no signal, the regime where replaying a past success should pay (GenEval's hard categories
    start at 5-24%).
    """
    g = _grey16(images)
    pred = _classifier().to(images.device)(g).argmax(-1).cpu()
    want = torch.tensor([prompt_digit(p) for p in prompts])
    bold = g.mean((1, 2, 3)).cpu() >= ink
    return ((pred == want) & bold).float()


@torch.no_grad()
def digit_heavy(images: torch.Tensor, prompts: list[str], ink: float = 0.42, width: float = 0.03) -> torch.Tensor:
    """A dense reward far from the base model ∈ [0, 1]: the prompted digit, legible, in heavy strokes,

        r = p_clf(d | x) · exp(−max(0, ink − mean p)² / (2·width²))

    on the grey 16×16 image p. The base draws the prompted digit with p_clf ≈ 0.93 but thin strokes
    (ink fraction: median 0.31, 99th percentile 0.37 over 384 rollouts), so its eval reward is 0.03,
    and 1 needs strokes bolder than any base sample while the classifier still reads the digit:
    every group has spread (unlike `digit_bold`), but the way to the ceiling is long. With
    ink = 0.40, width = 0.04 the base scores 0.15 and Flow-GRPO at lr 3e-3 reaches 0.92 in 40
    iterations; at these defaults it reaches 0.83 (lr 3e-3, then falls back) or 0.89 (lr 1e-3,
    still rising) at 60 (one seed; BENCHMARKS.md §15).
    """
    g = _grey16(images)
    labels = torch.tensor([prompt_digit(p) for p in prompts], device=images.device)
    probs = _classifier().to(images.device)(g).softmax(-1).gather(1, labels[:, None])[:, 0]
    short = (ink - g.mean((1, 2, 3))).clamp(min=0)
    return (probs * torch.exp(-short ** 2 / (2 * width ** 2))).float().cpu()


EMBEDDED_REWARDS = {
    "digit_heavy": digit_heavy,
    "digit_bold": digit_bold,
    "digit_alignment": digit_alignment,
    "jpeg_compressibility": jpeg_compressibility,
    "jpeg_incompressibility": jpeg_incompressibility,
    "stroke_quality": stroke_quality,
}
