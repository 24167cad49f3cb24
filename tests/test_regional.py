"""model.compile (flowpo.regional): the repeated blocks compiled in place, nothing recompiled after
the first iteration, values as eager's."""
import tempfile

import pytest
import torch

from conftest import TINY
from flowpo import config
from flowpo.regional import block_names, compile_blocks, compiled_frames
from flowpo.training.trainer import Trainer

RUN = TINY + ["train.iterations=3", "eval.every=0", "train.checkpoint_every=0", "sample.guidance=4.5",
              "reward.names=[stroke_quality]", "loss.kl_beta=0.01"]


def run(backend=None, preset="flow_grpo"):
    """3 iterations; → (weights, compiled frames after each iteration)."""
    cfg = config.load(None, preset, RUN + ["plan.window_size=2"])
    with tempfile.TemporaryDirectory() as d:
        tr = Trainer(cfg, d)
        if backend:
            assert compile_blocks(tr.policy.module, backend=backend) == 5  # the FlowNet's 5 ResBlocks
        frames = []
        for i in range(3):
            tr.train_iteration(i)
            tr.iteration = i + 1
            frames.append(compiled_frames())
        tr.evaluate()
        frames.append(compiled_frames())
        return {k: v.clone() for k, v in tr.policy.trainable_state_dict().items()}, frames


@pytest.mark.parametrize("preset", ["flow_grpo", pytest.param("mix_grpo_flash", marks=pytest.mark.slow)])
def test_traced_blocks_recompile_nothing_after_the_first_iteration_and_train_the_same_weights(preset):
    """dynamo's tracing with the eager backend (seconds, no code generation): the graphs of the
    rollout, the update (grad), the KL reference (adapters off) are made in iteration 0, none later."""
    torch._dynamo.reset()
    eager, _ = run(preset=preset)
    traced, frames = run("eager", preset=preset)
    assert frames[0] > 0 and frames[1:3] == [frames[0], frames[0]]
    assert all(torch.equal(eager[k], traced[k]) for k in eager)


@pytest.mark.slow
def test_inductor_blocks_match_eager_to_rounding():
    """Generated code (minutes on 2 CPU cores): weights within 1e-5 of eager's, no recompilation."""
    torch._dynamo.reset()
    eager, _ = run()
    compiled, frames = run("inductor")
    assert frames[1:3] == [frames[0], frames[0]]
    assert all(torch.allclose(eager[k], compiled[k], atol=1e-5) for k in eager)


def test_every_policy_transformer_has_known_blocks():
    from flowpo.embedded.flow_net import FlowNet

    assert block_names(FlowNet()) == ("ResBlock",)
    with pytest.raises(ValueError, match="model.compile=false"):
        compile_blocks(torch.nn.Linear(2, 2))


def test_the_diffusers_transformers_blocks_are_found():
    from tiny_pipelines import tiny_flux_pipeline, tiny_sd3_pipeline

    assert compile_blocks(tiny_sd3_pipeline().transformer, backend="eager") == 2      # 2 JointTransformerBlocks
    assert compile_blocks(tiny_flux_pipeline().transformer, backend="eager") >= 2
