"""Segment solvers: convergence order against the exact ODE flow of Gaussian data, edges,
eval counting, compressed segments, and parity with diffusers' DPM-Solver++(2M)."""
import math

import pytest
import torch

from flowpo.schedule import sigmas as make_sigmas
from flowpo.solvers import compressed_sigmas, compressed_steps, dpm2m, euler, solve

M, C = 0.3, 0.5  # Gaussian data x0 ~ N(M, C²·I)


def gaussian_velocity(x, sigma):
    """v = ((σ − (1−σ)c²)/V)·(x − (1−σ)m) − m, V = (1−σ)²c² + σ² (derivation in test_sde.py)."""
    s = sigma.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    var = (1 - s) ** 2 * C**2 + s**2
    return (s - (1 - s) * C**2) / var * (x - (1 - s) * M) - M


def exact_flow(x_a, sigma_a, sigma_b):
    """The probability-flow ODE of Gaussian data is affine and keeps the standardised value:
    x(σ) = (1−σ)m + √V(σ)·z with z fixed, so x_b = (1−σ_b)m + √(V_b/V_a)·(x_a − (1−σ_a)m)."""
    var = lambda s: (1 - s) ** 2 * C**2 + s**2  # noqa: E731
    return (1 - sigma_b) * M + math.sqrt(var(sigma_b) / var(sigma_a)) * (x_a - (1 - sigma_a) * M)


def _errors(name, sigma_a, sigma_b, steps):
    x_a = torch.linspace(-3, 3, 101).view(-1, 1)
    target = exact_flow(x_a, sigma_a, sigma_b)
    out = []
    for k in steps:
        x_b, n = solve(name, gaussian_velocity, x_a, compressed_sigmas(sigma_a, sigma_b, k, 3.0))
        assert n == k
        out.append((x_b - target).abs().max().item())
    return out


def test_euler_is_first_order():
    e = _errors("euler", 0.9, 0.1, [16, 32, 64])
    ratios = [a / b for a, b in zip(e, e[1:])]
    assert all(1.7 < r < 2.3 for r in ratios), ratios


def test_dpm2m_is_second_order():
    # the pre-asymptotic range of 2M with few steps is erratic (seen in diffusers too); from
    # 32 steps on the error ratio per doubling is ≈ 3.7, 4.0
    e = _errors("dpm2m", 0.9, 0.1, [32, 64, 128])
    ratios = [a / b for a, b in zip(e, e[1:])]
    assert all(r > 3.0 for r in ratios), ratios


def test_dpm2m_beats_euler_at_equal_evals():
    assert _errors("dpm2m", 0.9, 0.0, [16])[0] < _errors("euler", 0.9, 0.0, [16])[0] / 5


def test_full_range_edges():
    """σ = 1 start (λ = −∞) and σ = 0 end (λ = +∞) stay finite; the final step is x̂0 exactly."""
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    grid = make_sigmas(12, 3.0)
    err = {}
    for name in ("euler", "dpm2m"):
        x_end, n = solve(name, gaussian_velocity, x, grid)
        assert n == 12 and torch.isfinite(x_end).all()
        err[name] = (x_end - exact_flow(x, 1.0, 0.0)).abs().max().item()
    assert err["dpm2m"] < err["euler"] < 0.6, err  # 12 steps: ≈ 0.18 and 0.3 at |x| ≤ 3
    # one step into σ' = 0 is x̂0 = x − σ·v for both solvers
    seg = torch.tensor([0.3, 0.0])
    v = gaussian_velocity(x, torch.full((64,), 0.3))
    torch.testing.assert_close(solve("dpm2m", gaussian_velocity, x, seg)[0], x - 0.3 * v)
    torch.testing.assert_close(solve("euler", gaussian_velocity, x, seg)[0], x - 0.3 * v)


def test_first_dpm2m_step_from_one_is_euler():
    x = torch.randn(16, 2)
    seg = torch.tensor([1.0, 0.8])
    torch.testing.assert_close(dpm2m(gaussian_velocity, x, seg)[0], euler(gaussian_velocity, x, seg)[0])


def test_velocity_fn_gets_fp32_rows_and_count_matches():
    calls = []

    def vel(x, sigma):
        calls.append((x.dtype, sigma.dtype, tuple(sigma.shape)))
        return torch.zeros_like(x)

    x = torch.randn(5, 2, dtype=torch.bfloat16)
    out, n = solve("dpm2m", vel, x, torch.tensor([0.8, 0.5, 0.2]))
    assert n == 2 == len(calls) and out.dtype == torch.float32
    assert all(c == (torch.float32, torch.float32, (5,)) for c in calls)
    assert solve("euler", vel, x, torch.tensor([0.5]))[1] == 0


def test_validation():
    with pytest.raises(ValueError, match="'rk4'"):
        solve("rk4", gaussian_velocity, torch.zeros(1, 1), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="decreasing"):
        solve("euler", gaussian_velocity, torch.zeros(1, 1), torch.tensor([0.5, 0.6]))
    with pytest.raises(ValueError, match="ratio"):
        compressed_steps(10, 0.0)


def test_compressed_steps_and_sigmas():
    assert compressed_steps(21, 0.4) == 9  # ⌈8.4⌉: MixGRPO-Flash, T = 25, l = 0, w = 4
    assert compressed_steps(20, 0.4) == 8  # exact products are not rounded up
    assert compressed_steps(21, 0.2) == 5  # Flash*
    assert compressed_steps(1, 0.2) == 1 and compressed_steps(0, 0.4) == 0
    grid = make_sigmas(20, 3.0)
    # the compressed segment is the sub-grid of the same shifted schedule
    sub = compressed_sigmas(grid[4].item(), 0.0, 8, 3.0)
    torch.testing.assert_close(sub, grid[4::2])
    assert sub[0].item() == grid[4].item() and sub[-1].item() == 0.0


def test_dpm2m_matches_diffusers():
    """Parity with diffusers' DPMSolverMultistepScheduler (dpmsolver++, midpoint, flow sigmas)."""
    pytest.importorskip("diffusers")
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
        algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
        lower_order_final=True, final_sigmas_type="zero",
    )
    sched.set_timesteps(20)  # ≥ 15 steps: diffusers then uses first order on the final step only
    x = torch.randn(8, 2)
    ref = x.clone()
    for i, t in enumerate(sched.timesteps):
        ref = sched.step(gaussian_velocity(ref, sched.sigmas[i].expand(8).float()), t, ref).prev_sample
    ours, n = solve("dpm2m", gaussian_velocity, x, sched.sigmas.float())
    assert n == 20
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
