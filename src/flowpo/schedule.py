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


def dynamic_shift_mu(seq_len: int, base_seq_len: int, max_seq_len: int, base_shift: float,
                     max_shift: float) -> float:
    """The resolution-dependent shift of FLUX/SD3.5-style schedulers (`use_dynamic_shifting`):
    μ grows linearly in the number of latent tokens, from base_shift at base_seq_len to max_shift
    at max_seq_len; the scheduler then maps t ↦ e^μ / (e^μ + 1/t − 1)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (seq_len - base_seq_len)


def check_grid(sig: Tensor, T: int, key: str = "sample.sigmas") -> Tensor:
    """A σ grid of T steps: T + 1 values in [0, 1], strictly decreasing, ending at 0 → fp32 [T + 1].
    Raises ValueError naming `key` and the fix."""
    sig = torch.as_tensor(sig, dtype=torch.float32).flatten()
    if sig.numel() != T + 1:
        raise ValueError(f"{key} has {sig.numel()} values but sample.steps={T} needs {T + 1}; "
                         f"give {T + 1} values or set {key}=null to use the policy's own schedule")
    if not (float(sig[0]) <= 1.0 and float(sig[-1]) == 0.0 and bool((sig[1:] < sig[:-1]).all())):
        raise ValueError(f"{key}={sig.tolist()} must decrease strictly from at most 1 to exactly 0")
    return sig


def resolve(given, policy, T: int, shift: float) -> Tensor:
    """The schedule part: the training grid of T steps — `sample.sigmas` when given, else the
    policy's own (`policy.sigmas(T, shift)`: the pipeline scheduler's for diffusers models,
    `sigmas(T, shift)` for the embedded one)."""
    return check_grid(given if given is not None else policy.sigmas(T, shift), T)
