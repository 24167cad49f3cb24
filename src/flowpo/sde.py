"""Step kernels: one denoising transition σ → σ' < σ and its exact Gaussian log-density.

Notation (REFERENCE.md): x_σ = (1 − σ)·x0 + σ·ε, velocity v = ε − x0, dt = σ' − σ < 0,
x̂0 = x − σ·v, ε̂ = x + (1 − σ)·v. Every kernel draws x' ~ N(μ, s²·I) and scores

    log π(x' | x) = reduce_D [ −(x' − μ)² / (2s²) − log s − ½·log 2π ],   reduce ∈ {mean, sum}.

| kernel | s | μ |
|---|---|---|
| ode_step | 0 | x + dt·v |
| flow_grpo_step (2505.05470) | a·√(σ/(1−σ))·√(−dt) | x + dt·[v + (s_t²/(2σ))·ε̂], s_t = a·√(σ/(1−σ)) |
| dance_grpo_step (2505.07818) | η·√(−dt) | x + dt·[v + (η²/(2σ))·ε̂] |
| cps_step (2509.05952) | σ'·sin(aπ/2) | (1−σ')·x̂0 + √(σ'² − s²)·ε̂ |
| ddim_step (2603.28718) | η·σ'·√(1 − ((1−σ)σ'/((1−σ')σ))²) | (1−σ')·x̂0 + √(σ'² − s²)·ε̂ |

Conventions shared by all kernels:
- Everything is computed in fp32 whatever the dtype of x and v (bf16 overflows in μ).
- sigma and sigma_next are floats or tensors of shape [N]; std and log_prob have shape [N].
- A deterministic step (s = 0: the ODE, a zero noise level) has log_prob = 0 whatever `sample`
  is: a delta has no density, and 0 is the value that leaves ratios and sums untouched.
- The final transition into σ' = 0 is always deterministic: μ = x' = the ODE step = x̂0, s = 0,
  log_prob = 0. For CPS and DDIM this is their own limit. The Flow-GRPO and DanceGRPO formulas
  would still inject noise of std s_t·√σ there; that transition is never trained (REFERENCE.md),
  and the project lands exactly on x̂0 instead of adding noise to the final latent.
- The drawn sample and a later scoring of it share one code path: x' = μ + s·z is formed first and
  log_prob is always computed from (x' − μ), so `fn(x, v, …, sample=step.sample).log_prob` equals
  `step.log_prob` bit for bit (on-policy ratio exactly 1).
"""
from __future__ import annotations

import math
from typing import Callable, Literal, NamedTuple

import torch
from torch import Tensor

Reduction = Literal["mean", "sum"]
Sigma = float | Tensor

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
_TINY = 1e-12  # keeps denominators finite on degenerate input (σ = 0 or σ' = 1); no effect otherwise


class Step(NamedTuple):
    """One transition x → x'."""

    sample: Tensor  # [N, *D] fp32: the next latent x' (drawn, or the given `sample`)
    mean: Tensor  # [N, *D] fp32: μ
    std: Tensor  # [N] fp32: s, 0 for a deterministic step
    log_prob: Tensor  # [N] fp32: log N(x'; μ, s²I) reduced over D; 0 where s = 0


# ---------------------------------------------------------------------------------------------
# helpers


def _check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r} is not allowed; use 'mean' or 'sum'")


def _as_sigma(sigma: Sigma, x: Tensor) -> Tensor:
    """A float or [N] tensor → fp32 [N] on x's device."""
    s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    if s.dim() == 0:
        return s.expand(x.shape[0])
    if s.shape != (x.shape[0],):
        raise ValueError(f"sigma has shape {tuple(s.shape)}; expected a float or shape ({x.shape[0]},)")
    return s


def _b(t: Tensor, x: Tensor) -> Tensor:
    """[N] → [N, 1, …, 1] to broadcast against x [N, *D]."""
    return t.view(-1, *([1] * (x.dim() - 1)))


def _prepare(x: Tensor, v: Tensor, sigma: Sigma, sigma_next: Sigma, reduction: str):
    _check_reduction(reduction)
    if x.shape != v.shape:
        raise ValueError(f"x has shape {tuple(x.shape)} but v has shape {tuple(v.shape)}")
    x, v = x.float(), v.float()
    return x, v, _as_sigma(sigma, x), _as_sigma(sigma_next, x)


def predict_x0(x: Tensor, v: Tensor, sigma: Sigma) -> Tensor:
    """Tweedie data prediction x̂0 = x − σ·v (fp32; float64 when x or v is, as DiffusionNFT's
    loss needs). [N, *D]"""
    dt = torch.float64 if torch.float64 in (x.dtype, v.dtype) else torch.float32
    x, v = x.to(dt), v.to(dt)
    return x - _b(_as_sigma(sigma, x).to(dt), x) * v


def predict_noise(x: Tensor, v: Tensor, sigma: Sigma) -> Tensor:
    """Noise prediction ε̂ = x + (1 − σ)·v (fp32). [N, *D]"""
    x, v = x.float(), v.float()
    return x + (1 - _b(_as_sigma(sigma, x), x)) * v


def gaussian_log_prob(sample: Tensor, mean: Tensor, std: Tensor, reduction: Reduction = "mean") -> Tensor:
    """log N(x'; μ, s²I) = reduce_D[−(x' − μ)²/(2s²) − log s − ½ log 2π]; 0 where s = 0. → [N]"""
    _check_reduction(reduction)
    positive = std > 0  # [N]
    safe = torch.where(positive, std, torch.ones_like(std))  # [N], never 0: no inf/NaN in grads
    sb = _b(safe, mean)
    elem = -((sample - mean) ** 2) / (2 * sb**2) - torch.log(sb) - _HALF_LOG_2PI  # [N, *D]
    elem = elem.flatten(1)
    reduced = elem.mean(1) if reduction == "mean" else elem.sum(1)  # [N]
    return torch.where(positive, reduced, torch.zeros_like(reduced))


def _finish(x, v, sigma, sigma_next, mean, std, noise, sample, reduction) -> Step:
    """Apply the σ' = 0 convention, draw (or take) x' = μ + s·z and score it."""
    final = sigma_next <= 0  # [N]
    mean = torch.where(_b(final, x), x + _b(sigma_next - sigma, x) * v, mean)  # ODE step = x̂0
    std = torch.where(final, torch.zeros_like(std), std)  # [N]
    if sample is None:
        if noise is None:
            noise = torch.randn_like(mean)
        elif noise.shape != mean.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}; expected {tuple(mean.shape)}")
        sample = mean + _b(std, x) * noise.float()
    else:
        if sample.shape != mean.shape:
            raise ValueError(f"sample has shape {tuple(sample.shape)}; expected {tuple(mean.shape)}")
        sample = sample.float()
    return Step(sample, mean, std, gaussian_log_prob(sample, mean, std, reduction))


# ---------------------------------------------------------------------------------------------
# per-kernel std (elementwise on tensors of any common shape)


def _flow_grpo_rate(sigma: Tensor, sigma_next: Tensor, a: float) -> Tensor:
    """s_t = a·√(σ/(1−σ)); at σ = 1 the denominator uses 1 − σ' (Flow-GRPO's public code)."""
    denom = 1 - torch.where(sigma >= 1, sigma_next, sigma)
    return a * torch.sqrt(sigma / denom.clamp_min(_TINY))


def _flow_grpo_std(sigma, sigma_next, a):
    return _flow_grpo_rate(sigma, sigma_next, a) * torch.sqrt((sigma - sigma_next).clamp_min(0))


def _dance_grpo_std(sigma, sigma_next, eta):
    return eta * torch.sqrt((sigma - sigma_next).clamp_min(0))


def _cps_std(sigma, sigma_next, a):
    return sigma_next * math.sin(a * math.pi / 2)


def _ddim_std(sigma, sigma_next, eta):
    ratio = (1 - sigma) * sigma_next / ((1 - sigma_next) * sigma).clamp_min(_TINY)
    return eta * sigma_next * torch.sqrt((1 - ratio**2).clamp_min(0))


def _ode_std(sigma, sigma_next, noise_level):
    return torch.zeros_like(sigma)


_STD = {
    "ode": _ode_std,
    "flow_grpo": _flow_grpo_std,
    "dance_grpo": _dance_grpo_std,
    "cps": _cps_std,
    "ddim": _ddim_std,
}


def kernel_std(name: str, sigma: Sigma, sigma_next: Sigma, noise_level: float) -> Tensor:
    """The per-step std s of kernel `name` (fp32; 0 at σ' = 0 by the shared convention).

    Floats give a 0-d tensor, tensors keep their (broadcast) shape.
    """
    if name not in _STD:
        raise ValueError(f"kernel name={name!r} is unknown; allowed: {sorted(_STD)}")
    s = torch.as_tensor(sigma, dtype=torch.float32)
    s_next = torch.as_tensor(sigma_next, dtype=torch.float32, device=s.device)
    s, s_next = torch.broadcast_tensors(s, s_next)
    std = _STD[name](s, s_next, noise_level)
    return torch.where(s_next <= 0, torch.zeros_like(std), std)


# ---------------------------------------------------------------------------------------------
# kernels


def ode_step(x, v, sigma, sigma_next, noise_level=0.0, *, noise=None, sample=None, reduction="mean") -> Step:
    """Euler ODE step: x' = μ = x + dt·v, s = 0, log_prob = 0. `noise` and `noise_level` are unused."""
    x, v, sigma, sigma_next = _prepare(x, v, sigma, sigma_next, reduction)
    mean = x + _b(sigma_next - sigma, x) * v
    std = torch.zeros_like(sigma)
    return _finish(x, v, sigma, sigma_next, mean, std, torch.zeros_like(mean), sample, reduction)


def flow_grpo_step(x, v, sigma, sigma_next, noise_level, *, noise=None, sample=None, reduction="mean") -> Step:
    """Flow-GRPO SDE step (arXiv 2505.05470, Eq. 9), noise_level = a (0.7 by default there).

        s_t = a·√(σ/(1−σ))          (σ = 1: a·√(σ/(1−σ')))
        μ   = x + dt·[v + (s_t²/(2σ))·(x + (1−σ)·v)]
        s   = s_t·√(−dt)
    """
    x, v, sigma, sigma_next = _prepare(x, v, sigma, sigma_next, reduction)
    rate = _flow_grpo_rate(sigma, sigma_next, noise_level)  # [N]
    eps_hat = x + _b(1 - sigma, x) * v
    drift = v + _b(rate**2 / (2 * sigma.clamp_min(_TINY)), x) * eps_hat
    mean = x + _b(sigma_next - sigma, x) * drift
    std = _flow_grpo_std(sigma, sigma_next, noise_level)  # = rate·√(−dt), the table kernel_std reads
    return _finish(x, v, sigma, sigma_next, mean, std, noise, sample, reduction)


def dance_grpo_step(x, v, sigma, sigma_next, noise_level, *, noise=None, sample=None, reduction="mean") -> Step:
    """DanceGRPO SDE step (arXiv 2505.07818, Eq. 6), noise_level = η (0.3 on FLUX).

        μ = x + dt·[v + (η²/(2σ))·ε̂],   ε̂ = x + (1−σ)·v
        s = η·√(−dt)
    """
    x, v, sigma, sigma_next = _prepare(x, v, sigma, sigma_next, reduction)
    eps_hat = x + _b(1 - sigma, x) * v
    drift = v + _b(noise_level**2 / (2 * sigma.clamp_min(_TINY)), x) * eps_hat
    mean = x + _b(sigma_next - sigma, x) * drift
    std = _dance_grpo_std(sigma, sigma_next, noise_level)
    return _finish(x, v, sigma, sigma_next, mean, std, noise, sample, reduction)


def _coefficient_preserving_mean(x, v, sigma, sigma_next, std) -> Tensor:
    """μ = (1−σ')·x̂0 + √(σ'² − s²)·ε̂."""
    x0_hat = x - _b(sigma, x) * v
    eps_hat = x + _b(1 - sigma, x) * v
    keep = torch.sqrt((sigma_next**2 - std**2).clamp_min(0))  # [N]
    return _b(1 - sigma_next, x) * x0_hat + _b(keep, x) * eps_hat


def cps_step(x, v, sigma, sigma_next, noise_level, *, noise=None, sample=None, reduction="mean") -> Step:
    """Coefficients-preserving sampling (arXiv 2509.05952, Eq. 10), noise_level = a.

        s = σ'·sin(aπ/2),   μ = (1−σ')·x̂0 + √(σ'² − s²)·ε̂ = (1−σ')·x̂0 + σ'·cos(aπ/2)·ε̂

    With the true x0, ε the step gives (1−σ')·x0 + σ'·ε' with ε' a unit-variance draw.
    """
    x, v, sigma, sigma_next = _prepare(x, v, sigma, sigma_next, reduction)
    std = _cps_std(sigma, sigma_next, noise_level)
    mean = _coefficient_preserving_mean(x, v, sigma, sigma_next, std)
    return _finish(x, v, sigma, sigma_next, mean, std, noise, sample, reduction)


def ddim_step(x, v, sigma, sigma_next, noise_level, *, noise=None, sample=None, reduction="mean") -> Step:
    """DDIM-inspired SDE step of Stepwise-Flow-GRPO (arXiv 2603.28718), noise_level = η ∈ [0, 1].

        s = η·σ'·√(1 − ((1−σ)·σ' / ((1−σ')·σ))²)      (DDIM's posterior std for a = 1−σ, b = σ)
        μ = (1−σ')·x̂0 + √(σ'² − s²)·ε̂

    s ≤ σ', s = η·σ' at σ = 1, s = 0 at σ' = 0; η = 0 is the ODE step. The paper's exact noise is
    not stated unambiguously (REFERENCE.md); this is DDIM's choice.
    """
    x, v, sigma, sigma_next = _prepare(x, v, sigma, sigma_next, reduction)
    std = _ddim_std(sigma, sigma_next, noise_level)
    mean = _coefficient_preserving_mean(x, v, sigma, sigma_next, std)
    return _finish(x, v, sigma, sigma_next, mean, std, noise, sample, reduction)


Kernel = Callable[..., Step]

KERNELS: dict[str, Kernel] = {
    "ode": ode_step,
    "flow_grpo": flow_grpo_step,
    "dance_grpo": dance_grpo_step,
    "cps": cps_step,
    "ddim": ddim_step,
}
