"""Step kernels: exact densities, the on-policy bit-exactness, edges, and sampling properties
on Gaussian data whose velocity is known in closed form."""
import math

import pytest
import torch

from flowpo.schedule import sigmas as make_sigmas
from flowpo.sde import (
    KERNELS,
    Step,
    flow_grpo_step,
    kernel_std,
    ode_step,
    predict_noise,
    predict_x0,
)

SDE = ["flow_grpo", "dance_grpo", "cps", "ddim"]
LEVEL = {"ode": 0.0, "flow_grpo": 0.7, "dance_grpo": 0.3, "cps": 0.8, "ddim": 1.0}
M, C = 0.3, 0.5  # Gaussian data x0 ~ N(M, C²·I)


def gaussian_velocity(x: torch.Tensor, sigma) -> torch.Tensor:
    """Exact v(x, σ) = E[ε − x0 | x_σ = x] for x0 ~ N(m, c²I), per dimension.

    x_σ = (1−σ)x0 + σε is Gaussian with mean (1−σ)m and variance V = (1−σ)²c² + σ².
    Cov(x0, x_σ) = (1−σ)c² and Cov(ε, x_σ) = σ, so by Gaussian conditioning
        E[x0 | x] = m + ((1−σ)c²/V)·(x − (1−σ)m),   E[ε | x] = (σ/V)·(x − (1−σ)m),
        v = E[ε|x] − E[x0|x] = ((σ − (1−σ)c²)/V)·(x − (1−σ)m) − m.
    Check at σ = 1: V = 1 and v = x − m = ε − E[x0]. ✓
    """
    s = torch.as_tensor(sigma, dtype=torch.float32)
    if s.dim() == 1:
        s = s.view(-1, *([1] * (x.dim() - 1)))
    var = (1 - s) ** 2 * C**2 + s**2
    return (s - (1 - s) * C**2) / var * (x - (1 - s) * M) - M


def _xv(n=6, shape=(3, 4), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g).to(dtype)
    v = torch.randn(n, *shape, generator=g).to(dtype)
    return x, v


# ---------------------------------------------------------------------------------------------
# density and the on-policy guarantee


@pytest.mark.parametrize("name", SDE)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_log_prob_is_exact_gaussian(name, reduction):
    x, v = _xv()
    sigma = torch.tensor([1.0, 0.9, 0.7, 0.5, 0.3, 0.1])
    sigma_next = torch.tensor([0.95, 0.8, 0.6, 0.45, 0.2, 0.05])
    step = KERNELS[name](x, v, sigma, sigma_next, LEVEL[name], reduction=reduction)
    assert isinstance(step, Step)
    assert step.std.shape == (6,) and step.log_prob.shape == (6,)
    assert bool((step.std > 0).all())
    ref = torch.distributions.Normal(step.mean, step.std.view(-1, 1, 1)).log_prob(step.sample).flatten(1)
    ref = ref.mean(1) if reduction == "mean" else ref.sum(1)
    torch.testing.assert_close(step.log_prob, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(KERNELS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scoring_the_drawn_sample_is_bit_exact(name, dtype):
    x, v = _xv(dtype=dtype)
    sigma = torch.tensor([1.0, 0.9, 0.7, 0.5, 0.3, 0.25])
    sigma_next = torch.tensor([0.95, 0.8, 0.6, 0.45, 0.2, 0.0])
    drawn = KERNELS[name](x, v, sigma, sigma_next, LEVEL[name])
    scored = KERNELS[name](x, v, sigma, sigma_next, LEVEL[name], sample=drawn.sample)
    assert torch.equal(drawn.log_prob, scored.log_prob)  # ratio exactly 1
    assert torch.equal(drawn.mean, scored.mean) and torch.equal(drawn.std, scored.std)
    for t in drawn:
        assert t.dtype == torch.float32


def test_given_noise_is_used():
    x, v = _xv()
    z = torch.randn_like(x)
    a = flow_grpo_step(x, v, 0.6, 0.5, 0.7, noise=z)
    torch.testing.assert_close(a.sample, a.mean + a.std.view(-1, 1, 1) * z)
    b = flow_grpo_step(x, v, 0.6, 0.5, 0.7, noise=z)
    assert torch.equal(a.sample, b.sample)


def test_low_precision_inputs_are_cast_first():
    """bf16 inputs give the fp32 kernel applied to the bf16 values (no bf16 arithmetic)."""
    x, v = _xv(dtype=torch.bfloat16)
    z = torch.randn(x.shape)
    lo = flow_grpo_step(x, v, 0.5, 0.4, 0.7, noise=z)
    hi = flow_grpo_step(x.float(), v.float(), 0.5, 0.4, 0.7, noise=z)
    assert torch.equal(lo.sample, hi.sample) and torch.equal(lo.log_prob, hi.log_prob)


@pytest.mark.parametrize("name", list(KERNELS))
def test_reduction_is_validated(name):
    x, v = _xv()
    with pytest.raises(ValueError, match="'max'"):
        KERNELS[name](x, v, 0.5, 0.4, LEVEL[name], reduction="max")


def test_predictions():
    x, v = _xv()
    torch.testing.assert_close(predict_x0(x, v, 0.3), x - 0.3 * v)
    torch.testing.assert_close(predict_noise(x, v, 0.3), x + 0.7 * v)
    assert predict_x0(x.half(), v.half(), 0.3).dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# edges


@pytest.mark.parametrize("name", list(KERNELS))
def test_edges_are_finite_and_final_step_is_exact(name):
    x, v = _xv(dtype=torch.bfloat16)
    x, v = x * 100, v * 100  # large latents
    for sigma, sigma_next in [(1.0, 0.9), (1.0, 0.0), (0.3, 0.0), (1e-3, 0.0)]:
        step = KERNELS[name](x, v, sigma, sigma_next, LEVEL[name])
        for t in step:
            assert torch.isfinite(t).all(), (name, sigma, sigma_next)
        if sigma_next == 0.0:  # documented convention: deterministic, μ = x̂0, log_prob 0
            assert torch.equal(step.std, torch.zeros(6))
            assert torch.equal(step.log_prob, torch.zeros(6))
            torch.testing.assert_close(step.sample, predict_x0(x, v, sigma))
            assert torch.equal(step.sample, ode_step(x, v, sigma, 0.0).sample)


def test_flow_grpo_std_at_sigma_one_uses_next_sigma():
    # s = a·√(σ/(1−σ'))·√(σ−σ') at σ = 1: 0.7·√(1/0.1)·√0.1 = 0.7
    assert kernel_std("flow_grpo", 1.0, 0.9, 0.7).item() == pytest.approx(0.7, rel=1e-6)
    # away from 1: 0.7·√(0.5/0.5)·√0.1
    assert kernel_std("flow_grpo", 0.5, 0.4, 0.7).item() == pytest.approx(0.7 * math.sqrt(0.1), rel=1e-6)


def test_gradients_are_finite_at_edges():
    x, _ = _xv()
    v = torch.randn_like(x, requires_grad=True)
    sigma = torch.tensor([1.0, 1.0, 0.5, 0.2, 1e-4, 0.3])
    sigma_next = torch.tensor([0.9, 0.0, 0.4, 0.0, 0.0, 0.2])
    for name in KERNELS:
        step = KERNELS[name](x, v, sigma, sigma_next, LEVEL[name])
        sample = step.sample.detach()
        lp = KERNELS[name](x, v, sigma, sigma_next, LEVEL[name], sample=sample).log_prob
        (grad,) = torch.autograd.grad(lp.sum() + step.mean.sum(), v)
        assert torch.isfinite(grad).all(), name


def test_ode_has_zero_std_and_log_prob():
    x, v = _xv()
    step = ode_step(x, v, 0.6, 0.5, noise=torch.randn_like(x))
    assert torch.equal(step.std, torch.zeros(6)) and torch.equal(step.log_prob, torch.zeros(6))
    torch.testing.assert_close(step.sample, x - 0.1 * v)


# ---------------------------------------------------------------------------------------------
# CPS and DDIM: coefficient preservation, zero noise, the DDIM noise formula


@pytest.mark.parametrize("name,level", [("cps", 0.8), ("cps", 0.3), ("ddim", 1.0), ("ddim", 0.5)])
def test_coefficients_are_preserved_with_true_x0_and_eps(name, level):
    """With v = ε − x0 (so x̂0 = x0, ε̂ = ε exactly), x' = (1−σ')x0 + √(σ'²−s²)ε + s·z
    = (1−σ')x0 + σ'·ε' with ε' = (√(σ'²−s²)ε + s·z)/σ', whose variance (σ'²−s² + s²)/σ'² = 1."""
    g = torch.Generator().manual_seed(1)
    n, sigma, sigma_next = 200_000, 0.7, 0.5
    x0, eps, z = (torch.randn(n, 1, generator=g) for _ in range(3))
    x = (1 - sigma) * x0 + sigma * eps
    step = KERNELS[name](x, eps - x0, sigma, sigma_next, level, noise=z)
    s = step.std[0].item()
    assert 0 < s <= sigma_next
    eps_prime = (math.sqrt(sigma_next**2 - s**2) * eps + s * z) / sigma_next
    torch.testing.assert_close(step.sample, (1 - sigma_next) * x0 + sigma_next * eps_prime, atol=1e-5, rtol=1e-5)
    assert (sigma_next**2 - s**2 + s**2) / sigma_next**2 == pytest.approx(1.0)  # algebraic
    assert eps_prime.var().item() == pytest.approx(1.0, abs=0.01)  # empirical
    assert abs(torch.corrcoef(torch.cat([eps_prime, x0], 1).T)[0, 1].item()) < 0.01


@pytest.mark.parametrize("name", ["cps", "ddim"])
def test_zero_noise_level_is_the_ode_step(name):
    x, v = _xv()
    for sigma, sigma_next in [(1.0, 0.8), (0.6, 0.5), (0.2, 0.05)]:
        step = KERNELS[name](x, v, sigma, sigma_next, 0.0)
        assert torch.equal(step.std, torch.zeros(6)) and torch.equal(step.log_prob, torch.zeros(6))
        torch.testing.assert_close(step.sample, ode_step(x, v, sigma, sigma_next).sample, atol=1e-6, rtol=1e-6)


def test_ddim_noise_formula_properties():
    grid = make_sigmas(50, 3.0)
    for eta in (0.3, 1.0):
        s = kernel_std("ddim", grid[:-1], grid[1:], eta)  # [50]
        assert bool((s <= eta * grid[1:] + 1e-7).all())  # never exceeds η·σ' ≤ σ'
        assert s[0].item() == pytest.approx(eta * grid[1].item(), rel=1e-6)  # = η·σ' at σ = 1
        assert s[-1].item() == 0.0  # 0 at σ' = 0
    # the formula itself, off the σ' = 0 convention: s = η·σ'·√(1 − ((1−σ)σ'/((1−σ')σ))²)
    ratio = 0.5 * 0.4 / (0.6 * 0.5)
    assert kernel_std("ddim", 0.5, 0.4, 1.0).item() == pytest.approx(0.4 * math.sqrt(1 - ratio**2), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# sampling from pure noise lands on the data distribution (marginal-preserving kernels)


def _sample(name, T, n=20_000, dim=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    grid = make_sigmas(T, 3.0)
    x = torch.randn(n, dim, generator=g)
    for t in range(T):
        s, s_next = grid[t].item(), grid[t + 1].item()
        z = torch.randn(n, dim, generator=g)
        x = KERNELS[name](x, gaussian_velocity(x, s), s, s_next, LEVEL[name], noise=z).sample
    return x


@pytest.mark.parametrize("name", ["flow_grpo", "dance_grpo"])
def test_sde_sampling_converges_to_the_data(name):
    # 40k values: the std of the mean estimate is 0.5/200 = 0.0025, of the std estimate ≈ 0.0018
    coarse, fine = _sample(name, 10), _sample(name, 200)
    assert abs(fine.mean().item() - M) < 0.01
    assert abs(fine.std().item() - C) < 0.015
    assert abs(fine.std().item() - C) < abs(coarse.std().item() - C)


def test_ddim_sampling_std_approaches_the_data_as_T_grows():
    # REFERENCE.md: 0.40 → 0.49 for T = 10 → 400 at η = 1 (target 0.5)
    stds = [_sample("ddim", T, n=10_000, dim=1).std().item() for T in (10, 50, 200)]
    assert stds[0] < stds[1] < stds[2] < C + 0.01 and stds[2] > 0.47


# ---------------------------------------------------------------------------------------------
# OP-GRPO's late-step argument


def _log_ratio_var(name, sigma, sigma_next, delta=0.01, n=8192, dim=4, seed=0):
    """Var over draws of log π_new(x'|x) − log π_old(x'|x), x' ~ π_old, v_old = v* + δ."""
    g = torch.Generator().manual_seed(seed)
    x0 = M + C * torch.randn(n, dim, generator=g)
    x = (1 - sigma) * x0 + sigma * torch.randn(n, dim, generator=g)
    v_new = gaussian_velocity(x, sigma)
    old = KERNELS[name](x, v_new + delta, sigma, sigma_next, LEVEL[name], noise=torch.randn(n, dim, generator=g), reduction="sum")
    new = KERNELS[name](x, v_new, sigma, sigma_next, LEVEL[name], sample=old.sample, reduction="sum")
    return (new.log_prob - old.log_prob).var().item()


def test_flow_grpo_log_ratio_variance_grows_as_sigma_goes_to_zero():
    """At fixed |dt| = h the means differ by Δμ = h·δ·(1 + a²/2) and s² = a²·σ/(1−σ)·h, so
    Var = |Δμ|²/s² = D·h·δ²·(1 + a²/2)²·(1−σ)/(a²σ): ∝ (1−σ)/σ, 49× larger at σ = 0.02 than at 0.5."""
    h = 0.01
    sig = [0.5, 0.2, 0.1, 0.05, 0.03, 0.02]
    var = [_log_ratio_var("flow_grpo", s, s - h) for s in sig]
    assert all(a < b for a, b in zip(var, var[1:])), var
    assert var[-1] > 20 * var[0]
    a = LEVEL["flow_grpo"]
    predicted = 4 * h * 0.01**2 * (1 + a**2 / 2) ** 2 * (1 - 0.5) / (a**2 * 0.5)
    assert var[0] == pytest.approx(predicted, rel=0.1)


@pytest.mark.parametrize("name", SDE)
def test_every_sde_kernel_has_its_largest_log_ratio_variance_late(name):
    h = 0.01
    assert _log_ratio_var(name, 0.02, 0.02 - h) > 5 * _log_ratio_var(name, 0.5, 0.5 - h)


@pytest.mark.parametrize("name", ["ode", "flow_grpo", "dance_grpo", "cps", "ddim"])
def test_kernel_std_is_the_kernels_own_std(name):
    # kernel_std reads the same per-kernel table the kernels use, so the two cannot drift apart
    from flowpo.sde import KERNELS

    x, v = torch.randn(3, 2, 2), torch.randn(3, 2, 2)
    sig, sig_next = torch.tensor([1.0, 0.6, 0.3]), torch.tensor([0.9, 0.4, 0.0])
    st = KERNELS[name](x, v, sig, sig_next, 0.7)
    assert torch.equal(st.std, kernel_std(name, sig, sig_next, 0.7))
