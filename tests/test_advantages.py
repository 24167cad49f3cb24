"""Hand-derived checks of group and stepwise advantages."""
import math

import pytest
import torch

from flowpo.advantages import (aggregate_advantages, aggregate_stepwise_advantages, group_advantages,
                               stepwise_advantages)


def test_group_advantages_by_hand():
    # group 0: rewards 1, 3 (mean 2); group 1: 10, 10 (mean 10). Global population std of
    # [1, 3, 10, 10] = sqrt(((1-6)^2 + (3-6)^2 + 16 + 16)/4) = sqrt(66/4) = 4.0620
    r = torch.tensor([1.0, 3.0, 10.0, 10.0])
    g = torch.tensor([0, 0, 1, 1])
    a = group_advantages(r, g, std="global", eps=0.0)
    s = math.sqrt(66 / 4)
    assert torch.allclose(a, torch.tensor([-1 / s, 1 / s, 0.0, 0.0]), atol=1e-6)
    # per-group std: group 0 std = 1 → ±1; group 1 std 0 → 0/(0+eps) = 0
    a = group_advantages(r, g, std="group", eps=1e-4)
    assert torch.allclose(a, torch.tensor([-1 / 1.0001, 1 / 1.0001, 0.0, 0.0]), atol=1e-6)


def test_group_advantages_clip_and_errors():
    r = torch.tensor([0.0, 0.0, 0.0, 100.0])
    a = group_advantages(r, torch.zeros(4, dtype=torch.long), std="group", eps=1e-8, clip=1.5)
    assert a.max() == pytest.approx(1.5) and a.min() >= -1.5
    with pytest.raises(ValueError, match="std="):
        group_advantages(r, torch.zeros(4, dtype=torch.long), std="batch")


def test_multi_reward_aggregation_modes():
    # two rewards on very different scales; normalize_then_sum gives each equal say
    raw = torch.tensor([[1.0, 100.0], [2.0, 0.0], [3.0, 50.0], [4.0, 50.0]])
    w = torch.tensor([1.0, 1.0])
    g = torch.zeros(4, dtype=torch.long)
    a1 = aggregate_advantages(raw, w, g, aggregation="sum_then_normalize", std="group", eps=0.0)
    assert torch.allclose(a1, group_advantages(raw.sum(1), g, std="group", eps=0.0))
    a2 = aggregate_advantages(raw, w, g, aggregation="normalize_then_sum", std="group", eps=0.0)
    z0 = group_advantages(raw[:, 0], g, std="group", eps=0.0)
    z1 = group_advantages(raw[:, 1], g, std="group", eps=0.0)
    assert torch.allclose(a2, z0 + z1, atol=1e-6)
    assert not torch.allclose(a1, a2)


def test_stepwise_gains_telescope_and_joint_normalisation():
    torch.manual_seed(0)
    sr = torch.rand(6, 5)  # N=6, T=4
    g = torch.tensor([0, 0, 0, 1, 1, 1])
    gains = sr[:, 1:] - sr[:, :-1]
    assert torch.allclose(gains.sum(1), sr[:, -1] - sr[:, 0])  # telescoping
    a = stepwise_advantages(sr, g, normalize="joint", eps=0.0, clip=100)
    # by hand for group 0: one mean and one (population) std over its 3×4 gains
    g0 = gains[:3].double()
    expect = (g0 - g0.mean()) / g0.std(unbiased=False)
    assert torch.allclose(a[:3].double(), expect, atol=1e-5)
    assert a[:3].mean().abs() < 1e-5 and a[3:].mean().abs() < 1e-5


def test_stepwise_per_step_and_valid_mask():
    sr = torch.tensor([[0.0, 1.0, 1.0], [0.0, 3.0, 1.0]])
    g = torch.tensor([0, 0])
    a = stepwise_advantages(sr, g, normalize="per_step", eps=0.0)
    # step 0 gains 1 and 3 → −1, +1; step 1 gains 0 and −2 → +1, −1
    assert torch.allclose(a, torch.tensor([[-1.0, 1.0], [1.0, -1.0]]))
    valid = torch.tensor([[True, False], [True, False]])
    a = stepwise_advantages(sr, g, normalize="joint", eps=0.0, valid=valid)
    assert torch.allclose(a[:, 1], torch.zeros(2)) and torch.allclose(a[:, 0], torch.tensor([-1.0, 1.0]))


def test_stepwise_global_gain_std_shrinks_a_saturated_group():
    """gain_std='global': group mean, batch std. A group whose gains are all tiny (saturated reward)
    keeps small advantages; with the group's own std its noise is blown up to unit scale."""
    sr = torch.tensor([[0.0, 1.0, 1.0], [0.0, 3.0, 1.0],            # group 0: gains (1, 0), (3, -2)
                       [0.99, 0.991, 0.992], [0.99, 0.989, 0.990]])  # group 1: gains ±0.001
    g = torch.tensor([0, 0, 1, 1])
    gains = (sr[:, 1:] - sr[:, :-1]).double()
    glob = stepwise_advantages(sr, g, eps=0.0, clip=100, std="global")
    scale = gains.std(unbiased=False)  # over all 8 gains of the batch
    expect = torch.cat([gains[:2] - gains[:2].mean(), gains[2:] - gains[2:].mean()]) / scale
    assert torch.allclose(glob.double(), expect, atol=1e-5)
    assert glob[2:].abs().max() < 0.01
    local = stepwise_advantages(sr, g, eps=0.0, clip=100, std="group")
    assert local[2:].abs().max() > 0.9  # the saturated group's noise at unit scale
    with pytest.raises(ValueError, match="std='batch'"):
        stepwise_advantages(sr, g, std="batch")


def test_stepwise_multi_reward_aggregation():
    torch.manual_seed(1)
    sr = torch.rand(6, 5, 2)  # N=6, T=4, K=2
    sr[..., 1] *= 10.0        # the second reward has a 10× larger spread
    g = torch.tensor([0, 0, 0, 1, 1, 1])
    w = torch.tensor([1.0, 0.5])
    s2n = aggregate_stepwise_advantages(sr, w, g, aggregation="sum_then_normalize", eps=0.0, clip=100)
    assert torch.allclose(s2n, stepwise_advantages(sr @ w, g, eps=0.0, clip=100))
    n2s = aggregate_stepwise_advantages(sr, w, g, aggregation="normalize_then_sum", eps=0.0, clip=100)
    z0 = stepwise_advantages(sr[..., 0], g, eps=0.0, clip=100)
    z1 = stepwise_advantages(sr[..., 1], g, eps=0.0, clip=100)
    assert torch.allclose(n2s, z0 + 0.5 * z1, atol=1e-5)
    # normalising each reward first takes the small-spread reward into account; summing first
    # lets the large-spread reward dominate
    assert (torch.corrcoef(torch.stack([n2s.flatten(), z0.flatten()]))[0, 1]
            > torch.corrcoef(torch.stack([s2n.flatten(), z0.flatten()]))[0, 1])
    # one reward: both aggregations agree
    one = aggregate_stepwise_advantages(sr[..., :1], w[:1], g, aggregation="normalize_then_sum", eps=0.0)
    assert torch.allclose(one, aggregate_stepwise_advantages(sr[..., :1], w[:1], g,
                                                             aggregation="sum_then_normalize", eps=0.0))
    with pytest.raises(ValueError, match="K=2"):
        aggregate_stepwise_advantages(sr[..., 0], w, g, aggregation="sum_then_normalize")
