"""Stepwise-Flow-GRPO intermediate rewards."""
import math

import torch

from flowpo import config
from flowpo.parts import build_policy
from flowpo.rollout import ode_sample
from flowpo.schedule import sigmas
from flowpo.stepwise import intermediate_rewards, tweedie_estimate
from flowpo.training.trainer import Trainer


def test_tweedie_with_many_substeps_approaches_the_ode_end_point():
    policy = build_policy(config.load().model)
    cond = policy.encode_prompts(["a handwritten 3"] * 4)
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(4, *policy.latent_shape, generator=g)
    # the state at σ = 0.5 reached by the ODE, then its x̂0 estimates
    grid = torch.linspace(1.0, 0.5, 11)
    x_half, _ = ode_sample(policy, cond, torch.cat([grid, torch.zeros(0)]), x1, 1.0, 8)
    ref, _ = ode_sample(policy, cond, torch.linspace(0.5, 0.0, 201), x_half, 1.0, 8)
    sig = torch.full((4,), 0.5)
    errs = []
    for k in (1, 4, 16):
        est, nfe = tweedie_estimate(policy, x_half, sig, cond, substeps=k, guidance=1.0, batch_size=8)
        assert nfe == 4 * k
        errs.append(float((est - ref).pow(2).mean().sqrt()))
    assert errs[0] > errs[1] > errs[2] and errs[2] < 0.25 * errs[0]


def test_intermediate_rewards_fill_exactly_the_needed_states():
    policy = build_policy(config.load().model)
    T = 4
    s = sigmas(T)
    states = torch.randn(3, T + 1, *policy.latent_shape)
    train = torch.tensor([[True, True, False, False], [False, True, True, False], [False] * 4])
    calls = []

    def score(images, prompts):
        calls.append(len(prompts))
        return torch.arange(len(prompts), dtype=torch.float32) + 1

    final = torch.tensor([7.0, 8.0, 9.0])
    sr, valid, nfe = intermediate_rewards(policy, states, train, s, policy.encode_prompts(["7"] * 3), ["7"] * 3,
                                          final, score, substeps=2, guidance=1.0, batch_size=64)
    need = [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (1, 3)]
    assert calls == [len(need)]  # one batched reward call
    assert nfe == len(need) * 2
    for i, t in need:
        assert sr[i, t] > 0
    assert sr[2, :T].eq(0).all() and torch.equal(sr[:, T], final) and torch.equal(valid, train)


def test_stepwise_iteration_logs_gain_profile(tmp_path, tiny):
    tr = Trainer(config.load(None, "stepwise_grpo", tiny + ["advantage.substeps=2"]), tmp_path / "s")
    rec = tr.train_iteration(0)
    prof = rec["stepwise/mean_abs_gain_by_step"]
    assert len(prof) == 4 and prof[-1] == 0.0  # the last step is never trained
    # rows × T′ × states needing an estimate (x_0..x_3; x_4 is the final image) × 2 for CFG, less the
    # G − 1 copies of each group's shared x_0 (the preset's sample.shared_noise: estimated once)
    assert rec["stepwise/nfe"] == (8 * 4 - 2 * 3) * 2 * tr.policy.evals_per_row(tr.cfg.sample.guidance)


def test_stepwise_multi_reward_normalize_then_sum(tmp_path, tiny):
    """Two rewards: the iteration keeps each reward's estimates ([N, T+1, K]) and the two
    aggregations give different updates from the same rollout."""
    over = tiny + ["advantage.substeps=1", "reward.names=[digit_alignment,stroke_quality]", "reward.weights=[1.0,1.0]"]
    losses = {}
    for agg in ("sum_then_normalize", "normalize_then_sum"):
        tr = Trainer(config.load(None, "stepwise_grpo", over + [f"reward.aggregation={agg}"]), tmp_path / agg)
        rec = tr.train_iteration(0)
        assert math.isfinite(rec["loss/policy"]) and len(rec["stepwise/mean_abs_gain_by_step"]) == 4
        losses[agg] = rec["loss/policy"]
    assert losses["sum_then_normalize"] != losses["normalize_then_sum"]
