"""Wan22Policy on a tiny two-expert WanPipeline (tests/tiny_pipelines_2026.py), CPU, fp32, offline.

Against the pipeline's own `__call__` with its UniPC scheduler: the σ grid during the call, the
expert each step runs on (switch at the pipeline's step), the velocity it hands UniPC at each step
(CFG with guidance_scale / guidance_scale_2, integer timesteps) from the pipeline's own latents.
UniPC's predictor-corrector is not flowpo's sampler, so the ODE rollout is compared with the same
pipeline whose scheduler is FlowMatchEuler (Euler = flowpo's ODE kernel). Per-expert LoRA saved →
`load_lora_weights` (+ `load_into_transformer_2`) reproduces the policy; full mode; the config trains.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from pipeline_parity import (TINY_RUN, check_bf16_velocity_and_gradients, euler_rollout,  # noqa: E402
                             one_thread, perturb_trainable, record_call, tiny_run)  # noqa: F401 (a fixture)
from tiny_pipelines import save_tiny  # noqa: E402
from tiny_pipelines_2026 import tiny_wan22_pipeline  # noqa: E402

from flowpo.policy.registry import build_policy  # noqa: E402

RES, FRAMES, SEQ = 32, 5, 12
PROMPTS = ["a red cat", "a blue dog on the photo"]
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "wan22_hps.yaml"
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny(tiny_wan22_pipeline(seed=0, boundary_ratio=0.6), tmp_path_factory.mktemp("tiny") / "wan22")


def make(folder, pipe=None, **options):
    from flowpo.policy.wan22 import Wan22Policy

    kw = dict(resolution=RES, num_frames=FRAMES, max_sequence_length=SEQ, **options)
    return Wan22Policy(pipe, **kw) if pipe is not None else build_policy("wan22", folder, **kw)


def fresh_pipeline(folder, euler=False):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    pipe = WanPipeline.from_pretrained(folder, local_files_only=True)
    if euler:
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_pipeline(pipe, x, steps, g, g2):
    calls = []
    for name in ("transformer", "transformer_2"):  # which expert ran at each step
        module = getattr(pipe, name)
        module.register_forward_hook(lambda m, a, k, o, name=name: calls.append(name), with_kwargs=True)
    frames, seen = record_call(pipe, lambda: pipe(
        PROMPTS[: x.shape[0]], height=RES, width=RES, num_frames=FRAMES, num_inference_steps=steps, guidance_scale=g,
        guidance_scale_2=g2, latents=x.clone(), output_type="pt", max_sequence_length=SEQ).frames)
    per_step = calls[:: 2 if g > 1 else 1]  # cond and uncond calls with CFG
    return frames, seen, per_step


def test_unipc_call_grid_experts_and_velocities(folder):
    steps, n, g, g2 = 5, 2, 4.0, 2.5
    policy = make(folder, guidance_2=g2)
    assert policy.integer_timesteps and policy.boundary_ratio == 0.6
    x = torch.randn(n, *policy.latent_shape, generator=torch.Generator().manual_seed(3))
    _, seen, experts = run_pipeline(fresh_pipeline(folder), x, steps, g, g2)
    sigmas = policy.sigmas(steps)
    torch.testing.assert_close(sigmas, seen[0][3], atol=1e-6, rtol=0)  # UniPC's flow_shift grid
    high = policy.experts_of(sigmas[:-1])
    assert experts == ["transformer" if h else "transformer_2" for h in high.tolist()]
    assert 0 < int(high.sum()) < steps  # the switch happens inside the rollout
    cond = policy.encode_prompts(PROMPTS[:n])
    with torch.no_grad():
        for i, (v_pipe, t, x_pipe, _) in enumerate(seen):
            assert float(t) == float(policy.timesteps(sigmas[i:i + 1]))  # ⌊1000σ⌋
            torch.testing.assert_close(policy.velocity(x_pipe, sigmas[i].expand(n), cond, g), v_pipe, **TOL)
        mixed = torch.stack([sigmas[0], sigmas[-2]])  # one row per expert in one call
        v_mixed = policy.velocity(seen[0][2][:1].expand(2, *x.shape[1:]), mixed, policy.encode_prompts(PROMPTS[:1] * 2),
                                  g)
        torch.testing.assert_close(v_mixed[0], seen[0][0][0], **TOL)


def test_euler_rollout_equals_the_pipeline_with_an_euler_scheduler(folder):
    steps, n, g, g2 = 4, 2, 3.0, 1.5
    pipe = fresh_pipeline(folder, euler=True)
    x = torch.randn(n, 4, 2, 4, 4, generator=torch.Generator().manual_seed(4))
    frames, seen, experts = run_pipeline(pipe, x, steps, g, g2)
    policy = make(folder, pipe=fresh_pipeline(folder, euler=True), guidance_2=g2)
    assert not policy.integer_timesteps
    ours, vs, sigmas = euler_rollout(policy, PROMPTS[:n], x, steps, g)
    torch.testing.assert_close(sigmas, seen[0][3], atol=1e-6, rtol=0)
    assert experts == ["transformer" if h else "transformer_2" for h in policy.experts_of(sigmas[:-1]).tolist()]
    for v, (v_pipe, *_) in zip(vs, seen):
        torch.testing.assert_close(v, v_pipe, **TOL)
    torch.testing.assert_close(ours, frames.float().permute(0, 2, 1, 3, 4), atol=1e-5, rtol=1e-5)


def test_per_expert_lora_loads_into_the_pipeline(folder, tmp_path):
    policy = make(folder, lora_rank=4, lora_alpha=8, guidance_2=2.0)
    perturb_trainable(policy)
    keys = policy.trainable_state_dict()
    assert any(k.startswith("transformer_2.") for k in keys) and any(k.startswith("transformer.") for k in keys)
    policy.save_pretrained(str(tmp_path / "lora"))
    pipe = fresh_pipeline(folder)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    pipe.load_lora_weights(str(tmp_path / "lora" / "transformer_2"), load_into_transformer_2=True)
    x = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(5))
    _, seen, experts = run_pipeline(pipe, x, 4, 3.0, 2.0)
    assert set(experts) == {"transformer", "transformer_2"}
    sigmas, cond = policy.sigmas(4), policy.encode_prompts(PROMPTS)
    with torch.no_grad():
        for i, (v_pipe, _, x_pipe, _) in enumerate(seen):
            torch.testing.assert_close(policy.velocity(x_pipe, sigmas[i].expand(2), cond, 3.0), v_pipe, **TOL)
        with policy.disable_adapter():
            base = policy.velocity(seen[-1][2], sigmas[-2].expand(2), cond, 3.0)
    assert not torch.allclose(base, seen[-1][0], atol=1e-4)  # the low-noise LoRA matters


def test_full_mode_both_experts_train_and_reference_is_frozen(folder, tmp_path):
    full = make(folder, mode="full")
    x = torch.randn(2, *full.latent_shape, generator=torch.Generator().manual_seed(6))
    sigma, cond = torch.tensor([0.95, 0.2]), full.encode_prompts(PROMPTS)
    assert full.experts_of(sigma).tolist() == [True, False]
    base = full.velocity(x, sigma, cond, 3.0).detach()
    perturb_trainable(full, scale=0.02)
    v = full.velocity(x, sigma, cond, 3.0)
    assert not torch.allclose(v[0], base[0], atol=1e-4) and not torch.allclose(v[1], base[1], atol=1e-4)
    v.square().mean().backward()
    grads = {k for k, p in zip(full.trainable_state_dict(), full.trainable_parameters()) if p.grad is not None}
    assert any(k.startswith("transformer.") for k in grads) and any(k.startswith("transformer_2.") for k in grads)
    with full.disable_adapter():
        torch.testing.assert_close(full.velocity(x, sigma, cond, 3.0), base)
    from flowpo.training.distributed import shard_units

    assert len(shard_units(full.module)) == 4  # 2 blocks per expert
    full.save_pretrained(str(tmp_path / "full"))
    assert (tmp_path / "full" / "transformer_2" / "config.json").is_file()


def test_when_sharded_every_call_runs_both_experts_in_order(folder, monkeypatch):
    """Under FSDP2 each expert's forward/backward is a collective paired by order across ranks, and
    another rank may hold rows of the other expert (or a lock-step dummy row at σ = 0.5): a sharded
    pair must run both experts on every call, with unchanged values and gradients."""
    import flowpo.policy.wan22 as wan22

    policy = make(folder, mode="full")
    x = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(7))
    sigma, cond = torch.tensor([0.95, 0.9]), policy.encode_prompts(PROMPTS)  # both rows on the high expert
    ran = []
    for name in ("transformer", "transformer_2"):
        getattr(policy.module, name).register_forward_hook(lambda *a, name=name: ran.append(name))
    plain = policy.velocity(x, sigma, cond, 3.0)
    assert ran == ["transformer"]
    monkeypatch.setattr(wan22, "_is_sharded", lambda module: True)
    ran.clear()
    v = policy.velocity(x, sigma, cond, 3.0)
    assert ran == ["transformer", "transformer_2"]
    torch.testing.assert_close(v, plain)
    v.sum().backward()  # the dummy expert is in the graph (zero gradient), as on a rank with its rows
    names = policy.trainable_state_dict()
    low = [p for k, p in zip(names, policy.trainable_parameters()) if k.startswith("transformer_2.")]
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in low)


def test_eval_grids_of_videos_show_first_frames(tmp_path):
    """The trainer's eval grid gets the policy's decoded videos [N, 3, F, H, W] (it crashed on them)."""
    import numpy as np
    from PIL import Image

    from flowpo.training.runlog import save_grid

    videos = torch.rand(2, 3, 5, 16, 16, generator=torch.Generator().manual_seed(0))
    save_grid(videos, tmp_path / "v.png", nrow=2)
    save_grid(videos[:, :, 0], tmp_path / "f.png", nrow=2)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "v.png")), np.asarray(Image.open(tmp_path / "f.png")))


def test_errors_name_the_fix(folder, tmp_path):
    from tiny_pipelines import tiny_wan_pipeline

    one = save_tiny(tiny_wan_pipeline(seed=0), tmp_path / "wan21")
    with pytest.raises(ValueError, match="use model.kind='wan'"):
        build_policy("wan22", one, resolution=RES, num_frames=FRAMES)
    with pytest.raises(ValueError, match="use model.kind='wan22'"):
        build_policy("wan", folder, resolution=RES, num_frames=FRAMES)
    with pytest.raises(ValueError, match="boundary_ratio=1.5"):
        make(folder, boundary_ratio=1.5)
    with pytest.raises(ValueError, match="model.options.guidance_2='abc' must be a number"):
        make(folder, guidance_2="abc")


def test_bf16_with_checkpointing_returns_fp32_and_finite_gradients(folder):
    policy = make(folder, dtype="bf16", gradient_checkpointing=True)
    check_bf16_velocity_and_gradients(policy, PROMPTS, 3.0)


def test_split_cfg_equals_the_joint_call_or_opts_out(folder):
    """With one guidance for both experts split CFG is the joint call; with guidance_2 (per expert,
    which `guide` cannot see) the policy opts out."""
    from flowpo.guided import GuidedVelocity

    policy = make(folder, lora_rank=4, lora_alpha=8)
    perturb_trainable(policy, scale=0.1)
    x = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(9))
    sigma, cond = torch.tensor([0.95, 0.2]), policy.encode_prompts(PROMPTS)  # one row per expert
    guided = GuidedVelocity(policy, 3.0, "recompute")
    assert guided.split
    torch.testing.assert_close(guided(x, sigma, cond, keep=True)[0], policy.velocity(x, sigma, cond, 3.0), **TOL)
    assert not GuidedVelocity(make(folder, guidance_2=2.0), 3.0, "recompute").split


@pytest.mark.slow
@pytest.mark.ci
def test_wan22_hps_config_trains_a_tiny_pipeline(folder, tmp_path):
    import yaml

    raw = yaml.safe_load(CONFIG.read_text())
    assert raw["model"]["kind"] == "wan22" and raw["reward"]["names"] == ["hpsv2"]
    assert raw["reward"]["options"]["hpsv2"]["frames"] == "first"
    _, rec, moved = tiny_run(raw, tmp_path, [f"model.path={folder}", f"model.resolution={RES}",
                                             f"model.num_frames={FRAMES}", f"model.max_sequence_length={SEQ}",
                                             *TINY_RUN])
    assert rec["stats/ratio_mean"] == 1.0 and moved
