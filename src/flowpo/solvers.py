"""Deterministic segment solvers for the steps outside the trained window.

    solve(name, velocity_fn, x, sigmas) -> (x_end, n_evals)

`velocity_fn(x, sigma)` takes x [N, *D] and sigma [N] (fp32) and returns v [N, *D]; `sigmas` is
the decreasing segment σ_0 > … > σ_K (shape [K + 1]); n_evals = K is the number of
`velocity_fn` calls (each on all N rows; the trainer multiplies by rows and evals per row).
All arithmetic is fp32.

- "euler": x' = x + (σ' − σ)·v.
- "dpm2m": DPM-Solver++(2M) on the data prediction x̂0 = x − σ·v (Lu et al., arXiv 2211.01095,
  Alg. 2; the rectified-flow form MixGRPO-Flash uses, arXiv 2507.21802). With α = 1 − σ,
  λ = log(α/σ), h = λ' − λ:

      x' = (σ'/σ)·x + (α' − α·σ'/σ)·D,        (α' − α·σ'/σ = α'·(1 − e^{−h}))
      D  = (1 + 1/(2r))·x̂0_n − (1/(2r))·x̂0_{n−1},   r = h_{n−1}/h_n   (midpoint form)

  D = x̂0_n (first order, i.e. DDIM) on the first step, on a step into σ' = 0 (λ' = +∞; the
  update is then exactly x' = x̂0) and on the step after one that started at σ = 1 (λ = −∞ gives
  r = ∞, whose limit is the first-order update). The coefficients are written with σ ratios, so
  no infinite λ enters the arithmetic. A first-order step from σ = 1 equals the Euler step.

`Multistep` carries the same 2M history (the last x̂0 and h) along the grid steps a rollout takes
one by one, so the rollout's deterministic steps can be 2M steps themselves (`solver.grid=dpm2m`:
DiffusionNFT's rollout, arXiv 2509.16117, its authors' `dpm2` sampler) and a tail solver can
continue the history (`solver.warm_start`: MixGRPO's public code, whose first post-window step is
second order).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from flowpo.schedule import shift_sigma, unshift_sigma
from flowpo.sde import predict_x0

VelocityFn = Callable[[Tensor, Tensor], Tensor]


def _check_segment(sigmas: Tensor) -> list[float]:
    s = [float(t) for t in torch.as_tensor(sigmas).flatten()]
    if len(s) < 1:
        raise ValueError("sigmas must hold at least one value")
    if any(b >= a for a, b in zip(s, s[1:])):
        raise ValueError(f"sigmas must be strictly decreasing; got {s}")
    if s[0] > 1 or s[-1] < 0:
        raise ValueError(f"sigmas must lie in [0, 1]; got {s}")
    return s


def _sigma_row(value: float, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), value, dtype=torch.float32, device=x.device)  # [N]


def _lambda(sigma: float) -> float:
    """λ = log((1 − σ)/σ); −∞ at σ = 1, +∞ at σ = 0."""
    if sigma >= 1:
        return -math.inf
    if sigma <= 0:
        return math.inf
    return math.log((1 - sigma) / sigma)


def euler(velocity_fn: VelocityFn, x: Tensor, sigmas: Tensor) -> tuple[Tensor, int]:
    """Euler ODE over the segment: x ← x + (σ_{k+1} − σ_k)·v(x, σ_k). Returns (x_end, K)."""
    s = _check_segment(sigmas)
    x = x.float()
    for a, b in zip(s, s[1:]):
        x = x + (b - a) * velocity_fn(x, _sigma_row(a, x)).float()
    return x, len(s) - 1


def _dpm2m_update(x: Tensor, x0: Tensor, a: float, b: float, prev_x0: Tensor | None,
                  prev_h: float | None) -> tuple[Tensor, float]:
    """One 2M step σ = a → b from x and its x̂0_n, given the previous x̂0_{n−1} and h_{n−1} (None:
    first order). → (x', h)"""
    h = _lambda(b) - _lambda(a)
    second_order = prev_x0 is not None and math.isfinite(h) and math.isfinite(prev_h)
    if second_order:
        half_inv_r = h / (2 * prev_h)  # 1/(2r)
        d = (1 + half_inv_r) * x0 - half_inv_r * prev_x0
    else:
        d = x0
    return (b / a) * x + ((1 - b) - (1 - a) * b / a) * d, h


def dpm2m(velocity_fn: VelocityFn, x: Tensor, sigmas: Tensor,
          history: tuple[Tensor, float] | None = None) -> tuple[Tensor, int]:
    """DPM-Solver++(2M) in x̂0 form over the segment (see the module docstring). `history`: the
    (x̂0, h) of the step taken just before the segment (then its first step is second order).
    Returns (x_end, K)."""
    s = _check_segment(sigmas)
    x = x.float()
    prev_x0, prev_h = history if history is not None else (None, None)
    for a, b in zip(s, s[1:]):
        x0 = predict_x0(x, velocity_fn(x, _sigma_row(a, x)), a)  # x̂0_n
        x, h = _dpm2m_update(x, x0, a, b, prev_x0, prev_h)
        prev_x0, prev_h = x0, h
    return x, len(s) - 1


class Multistep:
    """The 2M history along grid steps taken one at a time (one per rollout chunk): `step` returns
    the 2M update of x from σ = a to b with velocity v and remembers x̂0 = x − a·v and h, whatever
    the step the rollout then takes (MixGRPO's code records x̂0 on its SDE window steps too)."""

    def __init__(self) -> None:
        self.x0: Tensor | None = None
        self.h: float | None = None

    def step(self, x: Tensor, v: Tensor, a: float, b: float) -> Tensor:
        x = x.float()
        x0 = predict_x0(x, v.float(), a)
        out, h = _dpm2m_update(x, x0, a, b, self.x0, self.h)
        self.x0, self.h = x0, h
        return out

    @property
    def history(self) -> tuple[Tensor, float] | None:
        return None if self.x0 is None else (self.x0, self.h)


SOLVERS: dict[str, Callable] = {"euler": euler, "dpm2m": dpm2m}
"""Segment solvers by name (the only list of them)."""


def solve(name: str, velocity_fn: VelocityFn, x: Tensor, sigmas: Tensor,
          history: tuple[Tensor, float] | None = None) -> tuple[Tensor, int]:
    """Integrate the probability-flow ODE over `sigmas` [K + 1] with solver `name` (`history`:
    dpm2m's warm start, see `dpm2m`; Euler has none).

    Returns (x_end [N, *D] fp32, n_evals = K). A one-element segment returns (x, 0).
    """
    if name not in SOLVERS:
        raise ValueError(f"solver name={name!r} is unknown; allowed: {list(SOLVERS)}")
    if history is not None and name == "dpm2m":
        return dpm2m(velocity_fn, x, sigmas, history)
    return SOLVERS[name](velocity_fn, x, sigmas)


STEP_RULES = ("ceil", "mixgrpo")
"""solver.step_rule: how many post-window steps n remaining grid steps become (`compressed_steps`)."""


def compressed_steps(n_steps: int, ratio: float, rule: str = "ceil") -> int:
    """MixGRPO-Flash's post-window step count for n remaining grid steps, at least 1 when n > 0
    (0 when n = 0):

    - ceil: ⌈n·r̃⌉ (the paper's (T − l − w)·r̃, rounded up; flowpo's first reading);
    - mixgrpo: int((n + 1)·r̃) − 1, what MixGRPO's public code takes (it builds a schedule of
      int((n + 1)·r̃) points from σ_e to 0; where that is 1 point its rollout stops short of σ = 0,
      flowpo takes 1 step instead).

    A 1e-9 slack absorbs float error (20·0.4 must give 8, not 9).
    """
    if n_steps < 0:
        raise ValueError(f"n_steps={n_steps!r} must be >= 0")
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio={ratio!r} must be in (0, 1]")
    if rule not in STEP_RULES:
        raise ValueError(f"rule={rule!r} is unknown; allowed: {list(STEP_RULES)}")
    if n_steps == 0:
        return 0
    if rule == "mixgrpo":
        return max(1, math.floor((n_steps + 1) * ratio + 1e-9) - 1)
    return max(1, math.ceil(n_steps * ratio - 1e-9))


def compressed_sigmas(sigma_a: float, sigma_b: float, n_steps: int, shift: float = 3.0) -> Tensor:
    """A segment from σ_a to σ_b in `n_steps` steps, placed on the same shifted schedule.

    Both ends are mapped back to the unshifted time t = σ/(s − (s−1)σ), the interval is split
    uniformly in t and shifted again (σ̃ = s·t/(1 + (s−1)·t)), so the coarse segment is the
    segment the training grid itself would have with n_steps steps there. Ends are exact.
    Returns fp32 [n_steps + 1].
    """
    if not 1 >= sigma_a > sigma_b >= 0:
        raise ValueError(f"need 1 >= sigma_a > sigma_b >= 0; got sigma_a={sigma_a!r}, sigma_b={sigma_b!r}")
    if n_steps < 1:
        raise ValueError(f"n_steps={n_steps!r} must be >= 1")
    t_a, t_b = unshift_sigma(torch.tensor([sigma_a, sigma_b], dtype=torch.float64), shift).tolist()
    t = torch.linspace(t_a, t_b, n_steps + 1, dtype=torch.float64)  # [n_steps + 1]
    out = shift_sigma(t, shift).to(torch.float32)
    out[0], out[-1] = sigma_a, sigma_b
    return out


# ----------------------------------------------------------------------------- the tail part
class GridTail:
    """solver.kind=euler: every step of the training grid runs one by one (the ODE steps are Euler)."""

    def stop(self, T: int, last_sde: int) -> int:
        """The grid step after which this tail takes over (T: never)."""
        return T

    def finish(self, velocity_fn: VelocityFn, x: Tensor, sigma_from: float, grid_steps: int,
               history: tuple[Tensor, float] | None = None) -> tuple[Tensor, int]:
        raise AssertionError("GridTail never takes over")  # pragma: no cover


class CompressedTail:
    """After the last stochastic step e, one `solver` segment from σ_e to 0 in
    `compressed_steps(T − e, r̃, step_rule)` steps on the shifted schedule (MixGRPO-Flash, arXiv
    2507.21802 §3.3). `warm_start`: the segment continues the rollout's 2M history (its first step
    second order, as MixGRPO's code); otherwise it restarts at first order."""

    def __init__(self, solver: str, compression: float, shift: float, step_rule: str = "ceil",
                 warm_start: bool = False):
        self.solver, self.compression, self.shift = solver, compression, shift
        self.step_rule, self.warm_start = step_rule, warm_start

    def stop(self, T: int, last_sde: int) -> int:
        return last_sde if last_sde < T else T

    def finish(self, velocity_fn: VelocityFn, x: Tensor, sigma_from: float, grid_steps: int,
               history: tuple[Tensor, float] | None = None) -> tuple[Tensor, int]:
        seg = compressed_sigmas(sigma_from, 0.0, compressed_steps(grid_steps, self.compression, self.step_rule),
                                self.shift)
        return solve(self.solver, velocity_fn, x, seg, history if self.warm_start else None)


TAILS: dict[str, Callable] = {
    "euler": lambda cfg: GridTail(),
    "dpm2m": lambda cfg: CompressedTail("dpm2m", cfg.solver.compression, cfg.sample.shift, cfg.solver.step_rule,
                                        cfg.solver.warm_start),
}
"""solver.kind → builder of the tail part from the run config (the only list of the names)."""
