"""Reward registry, user scorers by dotted path, and clear errors."""
import sys
import types

import pytest
import torch

from flowpo.rewards import RewardError, RewardSet, available


def _install(name, fn):
    mod = types.ModuleType(name)
    mod.score = fn
    sys.modules[name] = mod


def test_registry_lists_the_embedded_rewards():
    assert {"digit_alignment", "jpeg_compressibility", "jpeg_incompressibility", "stroke_quality"} <= set(available())


def test_dotted_path_scorer_and_weighted_sum():
    _install("my_scorers", lambda images, prompts: images.flatten(1).mean(1))
    rs = RewardSet(["my_scorers:score", "jpeg_compressibility"], [2.0, 0.0])
    x = torch.rand(3, 1, 16, 16)
    raw = rs.score(x, ["a handwritten 1"] * 3)
    assert raw.shape == (3, 2)
    assert torch.allclose(rs.combine(raw), 2 * x.flatten(1).mean(1))


def test_nan_reward_names_the_reward_and_count():
    _install("bad_scorers", lambda images, prompts: torch.tensor([0.0, float("nan"), float("inf")]))
    rs = RewardSet(["bad_scorers:score"], [1.0])
    with pytest.raises(RewardError, match=r"'bad_scorers:score' returned NaN/inf for 2 of 3 samples"):
        rs.score(torch.rand(3, 1, 16, 16), ["1"] * 3)


def test_raising_reward_and_bad_names():
    def boom(images, prompts):
        raise ValueError("model not loaded")

    _install("boom_scorers", boom)
    with pytest.raises(RewardError, match=r"'boom_scorers:score' raised ValueError: model not loaded \(scoring 2"):
        RewardSet(["boom_scorers:score"], [1.0]).score(torch.rand(2, 1, 16, 16), ["1"] * 2)
    with pytest.raises(RewardError, match="unknown reward 'pickscor'"):
        RewardSet(["pickscor"], [1.0])
    with pytest.raises(RewardError, match="cannot import module"):
        RewardSet(["no_such_pkg.mod:fn"], [1.0])
    _install("short_scorers", lambda images, prompts: torch.zeros(1))
    with pytest.raises(RewardError, match="returned 1 values for 2 samples"):
        RewardSet(["short_scorers:score"], [1.0]).score(torch.rand(2, 1, 16, 16), ["1"] * 2)


def test_nan_reward_never_reaches_the_weights(tmp_path, tiny):
    from flowpo import config
    from flowpo.training.trainer import Trainer

    # finite on the trainer's 2-image preflight, NaN on the rollout's batch
    _install("nan_scorers", lambda images, prompts: torch.full((images.shape[0],), float("nan") if images.shape[0] > 2
                                                                else 0.0))
    tr = Trainer(config.load(None, None, tiny + ["reward.names=[nan_scorers:score]"]), tmp_path / "n")
    before = {k: v.clone() for k, v in tr.policy.trainable_state_dict().items()}
    with pytest.raises(RewardError):
        tr.train_iteration(0)
    after = tr.policy.trainable_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_rewards_come_back_fp32_detached_on_the_cpu():
    """Whatever a scorer returns (float64, requiring grad; on a GPU, a CUDA tensor) the raw rewards
    are fp32 CPU tensors without autograd history (the trainer keeps rewards on the CPU)."""
    _install("f64_scorers", lambda images, prompts: torch.ones(images.shape[0], dtype=torch.float64,
                                                               requires_grad=True) * 0.5)
    raw = RewardSet(["f64_scorers:score"], [1.0]).score(torch.zeros(3, 1, 4, 4), ["a", "b", "c"])
    assert raw.dtype == torch.float32 and raw.device.type == "cpu" and not raw.requires_grad
    assert torch.equal(raw, torch.full((3, 1), 0.5))
