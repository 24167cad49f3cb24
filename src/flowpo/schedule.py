"""The σ schedule shared by sampling and training (SD3 time shift).

    σ̃ = s·σ / (1 + (s − 1)·σ),   σ = linspace(1, 0, T + 1)

(SD3, arXiv 2403.03206 §5.3.2; s = 3 is typical for SD3/FLUX at T = 10–25.) σ = 1 is pure noise,
σ = 0 is data. The inverse map is σ = σ̃ / (s − (s − 1)·σ̃).
"""
from __future__ import annotations

import torch
from torch import Tensor


def _check_shift(shift: float) -> None:
    if not shift > 0:
        raise ValueError(f"shift={shift!r} must be > 0")


def shift_sigma(sigma: Tensor, shift: float) -> Tensor:
    """σ̃ = s·σ / (1 + (s − 1)·σ), elementwise."""
    _check_shift(shift)
    return shift * sigma / (1 + (shift - 1) * sigma)


def unshift_sigma(sigma: Tensor, shift: float) -> Tensor:
    """Inverse of `shift_sigma`: σ = σ̃ / (s − (s − 1)·σ̃)."""
    _check_shift(shift)
    return sigma / (shift - (shift - 1) * sigma)


def sigmas(T: int, shift: float = 3.0) -> Tensor:
    """The decreasing grid σ_0 = 1 > σ_1 > … > σ_T = 0, fp32, shape [T + 1].

    Computed in float64 and rounded once; the ends are exactly 1 and 0.
    """
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"T={T!r} must be an int >= 1")
    base = torch.linspace(1.0, 0.0, T + 1, dtype=torch.float64)  # [T + 1]
    out = shift_sigma(base, shift).to(torch.float32)
    out[0], out[-1] = 1.0, 0.0
    return out
