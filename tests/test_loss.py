"""Hand-derived values of the clipped surrogate and the KL."""
import math

import torch

from flowpo.loss import clipped_surrogate, mean_kl


def test_on_policy_ratio_one_gives_minus_mean_advantage():
    lp = torch.tensor([-1.0, -2.0, -3.0], requires_grad=True)
    adv = torch.tensor([1.0, -2.0, 0.5])
    loss, st = clipped_surrogate(lp, lp.detach(), adv, 0.2, normalizer=3)
    # ρ = 1 everywhere → ℓ = −A; mean = −(1 − 2 + 0.5)/3 = 1/6
    assert math.isclose(float(loss.detach()), 1 / 6, rel_tol=1e-6)
    assert st.ratio_sum == 3.0 and st.clipped == 0
    loss.backward()
    # ∂ℓ/∂log π = −A·ρ/3
    assert torch.allclose(lp.grad, -adv / 3)


def test_clipping_by_hand():
    old = torch.zeros(2)
    lp = torch.log(torch.tensor([1.5, 0.5])).requires_grad_()
    adv = torch.tensor([1.0, 1.0])
    loss, st = clipped_surrogate(lp, old, adv, 0.2)
    # A>0: min(1.5, 1.2)=1.2 ; min(0.5, 0.8)=0.5  → −(1.2 + 0.5)
    assert math.isclose(float(loss.detach()), -1.7, rel_tol=1e-6)
    assert st.clipped == 2
    loss.backward()
    # the clipped branch (ratio 1.5 > 1.2 with A > 0) has zero gradient
    assert lp.grad[0] == 0 and lp.grad[1] != 0


def test_zero_advantage_zero_gradient_and_weights():
    lp = torch.randn(5, requires_grad=True)
    loss, _ = clipped_surrogate(lp, lp.detach() + 0.01, torch.zeros(5), 1e-4)
    loss.backward()
    assert torch.count_nonzero(lp.grad) == 0
    lp2 = torch.zeros(2, requires_grad=True)
    loss, _ = clipped_surrogate(lp2, torch.zeros(2), torch.tensor([1.0, 1.0]), 0.1,
                                weights=torch.tensor([2.0, 0.5]))
    assert math.isclose(float(loss.detach()), -2.5, rel_tol=1e-6)


def test_kl_forms():
    mu = torch.ones(2, 4)
    ref = torch.zeros(2, 4)
    std = torch.tensor([0.5, 1.0])
    kl = mean_kl(mu, ref, std, dt=-0.25, form="exact")
    assert torch.allclose(kl, torch.tensor([1 / (2 * 0.25), 1 / 2]))
    kl2 = mean_kl(mu, ref, std, dt=-0.25, form="flow_grpo")  # divides by 2·s²/|dt|
    assert torch.allclose(kl2, kl * 0.25)
