"""Full fine-tuning of the 2026 models sharded with FSDP2 (as tests/test_fsdp.py for SD3): 2 gloo ranks
end with the weights of 1 process. Z-Image's `layers`/refiners, FLUX.2's double/single blocks and
Wan2.2's ExpertPair (both experts' blocks, through one root forward) are the shard units. Slow only
(~30 s each); tests/test_wan22.py checks in CI that a sharded pair runs both experts on every call."""
import os
from pathlib import Path

import pytest

from test_fsdp import SRC, final_weights, max_diff, one_process, torchrun

COMMON = ["model.mode=full", "train.iterations=2", "train.lr=1e-4", "train.weight_decay=0", "sample.steps=3",
          "sample.prompts_per_iteration=2", "sample.group_size=2", "sample.batch_size=2", "sample.guidance=2.0",
          "eval.prompts=2", "eval.samples_per_prompt=1", "eval.steps=2", "eval.every=2", "train.checkpoint_every=2",
          "reward.names=[tiny_pipelines:brightness_reward]", "log.progress=false", "log.tensorboard=false",
          "log.grids=false", "train.threads=1"]


def _folder(kind, tmp):
    from tiny_pipelines import save_tiny
    import tiny_pipelines_2026 as t

    build, extra = {
        "zimage": (t.tiny_zimage_pipeline, ["model.resolution=16", "model.max_sequence_length=24"]),
        # joint CFG: with the default split (reuse) the 1- and 2-rank runs differ by 6.9e-6 (both
        # branches' batch layouts differ, Adam amplifies the rounding; SD3 shows 1.4e-6), too near 1e-5
        "flux2": (t.tiny_flux2_klein_pipeline, ["model.resolution=16", "model.max_sequence_length=24",
                                                "model.options.text_encoder_out_layers=[1, 2, 3]",
                                                "model.cfg_uncond=joint"]),
        "wan22": (lambda seed: t.tiny_wan22_pipeline(seed, boundary_ratio=0.6),
                  ["model.resolution=32", "model.num_frames=5", "model.max_sequence_length=12",
                   "model.options.guidance_2=1.5"]),
    }[kind]
    return [f"model.kind={kind}", f"model.path={save_tiny(build(0), tmp / kind)}", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["wan22", "zimage", "flux2"])  # ~30 s each on 2 loaded cores
def test_fsdp2_full_two_ranks_equal_one(tmp_path, kind):
    pytest.importorskip("diffusers")
    args = _folder(kind, tmp_path) + COMMON
    base = one_process(tmp_path / "one", "flow_grpo", args)
    torchrun(2, ["train", "--preset", "flow_grpo", "--out", str(tmp_path / "two")] + args,
             PYTHONPATH=os.pathsep.join([SRC, str(Path(__file__).resolve().parent)]))
    worst = max_diff(final_weights(tmp_path / "one"), final_weights(tmp_path / "two"))
    print(f"{kind}: max |Δθ| = {worst:.2e}")
    assert worst < 1e-5, worst
    assert max_diff(base, final_weights(tmp_path / "one")) > 1e-4  # the weights did move
