"""model.cfg_uncond (flowpo.guided): the update takes CFG's unconditional outputs from the rollout
while the weights are the rollout's, with trained weights bit-identical to recomputing them, and
the update's transformer rows drop by what it took."""
import tempfile

import pytest
import torch

from conftest import TINY
from flowpo import config
from flowpo.guided import GuidedVelocity
from flowpo.presets import PRESETS
from flowpo.training.trainer import Trainer

# presets that need a shorter window / fewer sub-steps at TINY's 4 steps
FIT = ["plan.window_size=2", "plan.window_min=1", "plan.num_steps=2", "advantage.substeps=2"]
CI_PRESETS = ["flow_grpo", "op_grpo", "mix_grpo_flash", "stepwise_grpo"]


def train(preset, mode, extra=(), iterations=3, base=TINY):
    cfg = config.load(None, preset, list(base) + FIT + [
        f"train.iterations={iterations}", "eval.every=0", "train.checkpoint_every=0", "sample.guidance=4.5",
        "reward.names=[stroke_quality]", f"model.cfg_uncond={mode}", "objective.allow_cfg=true", *extra])
    with tempfile.TemporaryDirectory() as d:
        tr = Trainer(cfg, d)
        for i in range(iterations):
            tr.train_iteration(i)
            tr.iteration = i + 1
        return {k: v.clone() for k, v in tr.policy.trainable_state_dict().items()}


def identical(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("preset", [pytest.param(p, marks=() if p in CI_PRESETS else pytest.mark.slow)
                                    for p in PRESETS])
def test_reuse_trains_the_same_weights_as_recompute(preset):
    """Every preset, 3 iterations on the embedded model with CFG 4.5: bit-identical weights.
    (dance_grpo_rows re-scores a subset of a chunk's rows, where the recomputed v_u comes from a
    smaller batch than the rollout's; its weights agree to rounding.)"""
    reuse, recompute = train(preset, "reuse"), train(preset, "recompute")
    if PRESETS[preset].overrides.get("loss.forward_rows") == "trained":
        assert all(torch.allclose(reuse[k], recompute[k], atol=1e-5) for k in reuse)
    else:
        assert identical(reuse, recompute)


def test_joint_and_split_agree_to_rounding():
    """The batched 2N-row forward and the two N-row forwards are the same math."""
    a, b = train("flow_grpo", "joint"), train("flow_grpo", "reuse")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def update_rows(mode, *extra):
    """Rows through the model in one update (iteration 1) of flow_grpo at TINY (8 rows, 2 chunks
    of 4, 3 trained steps), CFG 4.5, no KL reference."""
    cfg = config.load(None, "flow_grpo", TINY + ["eval.every=0", "train.checkpoint_every=0", "sample.guidance=4.5",
                                                 "reward.names=[stroke_quality]", "loss.kl_beta=0",
                                                 f"model.cfg_uncond={mode}", "objective.allow_cfg=true", *extra])
    with tempfile.TemporaryDirectory() as d:
        tr = Trainer(cfg, d)
        tr.train_iteration(0)
        rows, on = [0], [False]
        tr.policy.module.register_forward_pre_hook(lambda m, args: rows.__setitem__(0, rows[0] + on[0] * args[0].shape[0]))
        upd = tr._update

        def counted(b):
            on[0] = True
            try:
                return upd(b)
            finally:
                on[0] = False

        tr._update = counted
        rec = tr.train_iteration(1)
        assert rec["stats/transitions"] == 24 * cfg.train.inner_epochs
        return rows[0]


def test_reuse_halves_the_update_rows_before_the_first_optimizer_step():
    # one minibatch: every (chunk, step) is scored at the rollout's weights → 24 cond rows only
    assert update_rows("joint", "train.minibatches=1") == 48      # 2N rows per forward
    assert update_rows("recompute", "train.minibatches=1") == 48  # N cond + N uncond
    assert update_rows("reuse", "train.minibatches=1") == 24
    # two minibatches (one chunk each): the second runs after an optimizer step and recomputes v_u
    assert update_rows("reuse", "train.minibatches=2") == 12 + 24
    # two inner epochs: the second pass recomputes everything
    assert update_rows("reuse", "train.minibatches=1", "train.inner_epochs=2") == 24 + 48


def test_nothing_is_reused_without_cfg_or_with_gradient_through_both_branches():
    from flowpo.policy.embedded import EmbeddedPolicy

    p = EmbeddedPolicy()
    assert not GuidedVelocity(p, 1.0, "reuse").split                       # no CFG: one branch
    assert not GuidedVelocity(p, 4.5, "joint").split
    g = GuidedVelocity(p, 4.5, "reuse", cfg_grad="both")
    assert g.split and not g.reuse
    with pytest.raises(ValueError, match="allowed: joint, recompute, reuse"):
        GuidedVelocity(p, 4.5, "sometimes")


def test_split_velocity_equals_the_policy_velocity_and_passes_gradient_to_the_conditional_branch_only():
    from flowpo.policy.embedded import EmbeddedPolicy

    torch.manual_seed(0)
    p = EmbeddedPolicy()
    x, sig = torch.randn(16, 1, 16, 16), torch.rand(16)
    cond = p.encode_prompts(["a three"] * 16)
    g = GuidedVelocity(p, 4.5, "reuse")
    v, v_u = g(x, sig, cond)
    assert torch.allclose(v, p.velocity(x, sig, cond, 4.5), atol=1e-5) and not v_u.requires_grad
    with torch.no_grad():  # a pass without a graph runs joint unless asked to keep v_u (the rollout)
        assert g(x, sig, cond)[1] is None and torch.equal(g(x, sig, cond, keep=True)[1], v_u)
    v2, _ = g(x, sig, cond, uncond=v_u)  # the reused tensor gives the same value bit for bit
    assert torch.equal(v, v2)
    v2.sum().backward()
    assert any(q.grad is not None and q.grad.abs().sum() > 0 for q in p.trainable_parameters())


@pytest.mark.slow
@pytest.mark.parametrize("preset", [pytest.param(p, marks=pytest.mark.ci) if p == "flow_grpo" else p
                                    for p in PRESETS])
def test_reuse_trains_the_same_weights_on_a_tiny_sd3_pipeline(preset, tmp_path):
    """The tiny SD3 pipeline with true CFG: bit-identical weights after 3 iterations."""
    from tiny_pipelines import save_tiny, tiny_sd3_pipeline

    folder = save_tiny(tiny_sd3_pipeline(seed=0), tmp_path / "sd3")
    base = [f"model.kind=sd3", f"model.path={folder}", "model.lora_rank=4", "model.lora_alpha=8",
            "model.resolution=16", "sample.steps=4", "sample.prompts_per_iteration=2", "sample.group_size=3",
            "sample.batch_size=3", "eval.prompts=2", "log.progress=false", "log.tensorboard=false",
            "reward.names=[tiny_pipelines:brightness_reward]"]
    extra = ["reward.names=[tiny_pipelines:brightness_reward]"]
    reuse = train(preset, "reuse", extra, base=base)
    recompute = train(preset, "recompute", extra, base=base)
    if PRESETS[preset].overrides.get("loss.forward_rows") == "trained":
        assert all(torch.allclose(reuse[k], recompute[k], atol=1e-5) for k in reuse)
    else:
        assert identical(reuse, recompute)
