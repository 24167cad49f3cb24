"""ZImagePolicy on a tiny random ZImagePipeline (tests/tiny_pipelines_2026.py), CPU, fp32, offline.

Checked against the pipeline's own `__call__`: the σ grid during the call, the velocity it hands its
scheduler at each step (reversed time 1 − σ, negated output, CFG with g = 1 + guidance_scale,
cfg_truncation, cfg_normalization, captions of different lengths unpadded), the decoded images of an
ODE rollout; prompt rows = the pipeline's encoding; LoRA saved → `load_lora_weights` reproduces the
policy; full mode; options through `model.options`; the example config trains one iteration.
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
from tiny_pipelines_2026 import tiny_zimage_pipeline  # noqa: E402

from flowpo.policy.registry import build_policy  # noqa: E402

RES, SEQ = 16, 32
PROMPTS = ["a red cat", "a blue dog on the photo of a sign"]
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "zimage_ocr.yaml"
TOL = dict(atol=1e-5, rtol=1e-5)  # fp32, same operations in a different batch layout


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny(tiny_zimage_pipeline(seed=0), tmp_path_factory.mktemp("tiny") / "zimage")


def make(folder, **options):
    return build_policy("zimage", folder, resolution=RES, max_sequence_length=SEQ, **options)


def fresh_pipeline(folder):
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_pipeline(pipe, x, steps, guidance, **kw):
    """The pipeline from latents x at flowpo guidance g (its guidance_scale g − 1)."""
    return record_call(pipe, lambda: pipe(
        PROMPTS[: x.shape[0]], height=RES, width=RES, num_inference_steps=steps, guidance_scale=guidance - 1.0,
        latents=x.clone(), output_type="pt", max_sequence_length=SEQ, **kw).images)


def test_prompt_rows_are_the_pipelines_hidden_layer_minus_2_unpadded(folder):
    policy = make(folder)
    cond = policy.encode_prompts(PROMPTS)
    embeds, _ = fresh_pipeline(folder).encode_prompt(list(PROMPTS), device="cpu", do_classifier_free_guidance=False,
                                                     max_sequence_length=SEQ)
    assert embeds[0].shape[0] != embeds[1].shape[0]  # different lengths: padding really removed
    for i, e in enumerate(embeds):
        n = e.shape[0]
        assert cond["prompt_mask"][i].sum() == n and cond["prompt_mask"][i, n:].sum() == 0
        torch.testing.assert_close(cond["prompt_embeds"][i, :n], e)


@pytest.mark.parametrize("guidance,kw", [(4.0, {}), (1.0, {}), (3.0, {"cfg_truncation": 0.3}),
                                         (5.0, {"cfg_normalization": 1.05})])
def test_parity_with_the_pipelines_own_call(folder, guidance, kw):
    steps, n = 4, 2
    policy = make(folder, **kw)
    x = torch.randn(n, *policy.latent_shape, generator=torch.Generator().manual_seed(3))
    images, seen = run_pipeline(fresh_pipeline(folder), x, steps, guidance, **kw)
    ours, vs, sigmas = euler_rollout(policy, PROMPTS[:n], x, steps, guidance)
    torch.testing.assert_close(sigmas, seen[0][3], atol=1e-6, rtol=0)  # the grid during __call__
    assert len(seen) == steps
    if "cfg_truncation" in kw:  # some but not all steps run without guidance
        assert 0 < int(((1 - sigmas[:-1]) > kw["cfg_truncation"]).sum()) < steps
    cond = policy.encode_prompts(PROMPTS[:n])
    with torch.no_grad():
        for i, (v_pipe, t, x_pipe, _) in enumerate(seen):
            torch.testing.assert_close(t.float(), sigmas[i] * 1000, atol=1e-3, rtol=0)
            torch.testing.assert_close(policy.velocity(x_pipe, sigmas[i].expand(n), cond, guidance), v_pipe, **TOL)
            torch.testing.assert_close(vs[i], v_pipe, **TOL)
    torch.testing.assert_close(ours, images.float(), **TOL)


def test_a_row_without_caption_tokens_runs(folder):
    """flowpo.lockstep's dummy row (a rank without rows under FSDP2) has an all-zero conditioning."""
    policy = make(folder)
    cond = {k: torch.zeros_like(v[:1]) for k, v in policy.encode_prompts(PROMPTS[:1]).items()}
    v = policy.velocity(torch.zeros(1, *policy.latent_shape), torch.full((1,), 0.5), cond, 3.0)
    assert v.shape == (1, *policy.latent_shape) and torch.isfinite(v).all()


def test_truncation_and_normalization_act(folder):
    policy = make(folder)
    perturb_trainable(policy, scale=0.05)
    x = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(4))
    cond = policy.encode_prompts(PROMPTS)
    sigma = torch.tensor([0.9, 0.2])  # 1 − σ = 0.1 and 0.8
    v_c, v_g = policy.velocity(x, sigma, cond, 1.0), policy.velocity(x, sigma, cond, 4.0)
    policy.cfg_truncation = 0.5  # the second row (1 − σ = 0.8 > 0.5) drops guidance
    v_t = policy.velocity(x, sigma, cond, 4.0)
    torch.testing.assert_close(v_t[0], v_g[0])
    torch.testing.assert_close(v_t[1], v_c[1])
    assert not torch.allclose(v_g[1], v_c[1], atol=1e-4)
    policy.cfg_truncation, policy.cfg_normalization = 1.0, 1.0
    v_n = policy.velocity(x, sigma, cond, 4.0)
    ratio = v_n.flatten(1).norm(dim=1) / v_c.flatten(1).norm(dim=1)
    assert (ratio <= 1 + 1e-5).all() and not torch.allclose(v_n, v_g)


def test_lora_save_then_pipeline_load_lora_weights_reproduces_policy(folder, tmp_path):
    policy = make(folder, lora_rank=4, lora_alpha=8)
    perturb_trainable(policy)
    assert len([n for n, _ in policy.module.named_parameters() if ".lora_A" in n]) == 4 * 7  # 2 + 2 refiners
    policy.save_pretrained(str(tmp_path / "lora"))
    pipe = fresh_pipeline(folder)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    x = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(5))
    images, seen = run_pipeline(pipe, x, 2, 4.0)
    ours, vs, _ = euler_rollout(policy, PROMPTS, x, 2, 4.0)
    for v, (v_pipe, *_) in zip(vs, seen):
        torch.testing.assert_close(v, v_pipe, **TOL)
    torch.testing.assert_close(ours, images.float(), **TOL)
    with policy.disable_adapter(), torch.no_grad():
        base = policy.velocity(x, torch.ones(2), policy.encode_prompts(PROMPTS), 4.0)
    assert not torch.allclose(base, seen[0][0], atol=1e-4)  # the LoRA matters


def test_full_mode_reference_and_gradients(folder):
    full = make(folder, mode="full")
    x = torch.randn(2, *full.latent_shape, generator=torch.Generator().manual_seed(6))
    sigma, cond = torch.tensor([0.7, 0.3]), full.encode_prompts(PROMPTS)
    base = full.velocity(x, sigma, cond, 4.0).detach()
    perturb_trainable(full, scale=0.02)
    v = full.velocity(x, sigma, cond, 4.0)
    assert not torch.allclose(v, base, atol=1e-4)
    v.square().mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in full.trainable_parameters())
    with full.disable_adapter():
        torch.testing.assert_close(full.velocity(x, sigma, cond, 4.0), base)


def test_options_come_from_model_options_and_errors_name_the_fix(folder):
    from flowpo import config
    from flowpo.parts import build_policy as from_cfg

    cfg = config.load(None, None, ["model.kind=zimage", f"model.path={folder}", f"model.resolution={RES}",
                                   "model.options.cfg_truncation=0.25", "model.device=cpu"])
    policy = from_cfg(cfg.model)
    assert policy.cfg_truncation == 0.25 and policy.latent_shape == (4, 8, 8)
    cfg.model.options = {"no_such_option": 1}
    with pytest.raises(ValueError, match="model.options.no_such_option is not an option of model.kind='zimage'"):
        from_cfg(cfg.model)
    with pytest.raises(ValueError, match="cfg_truncation=1.5"):
        make(folder, cfg_truncation=1.5)


def test_bf16_with_checkpointing_returns_fp32_and_finite_gradients(folder):
    policy = make(folder, dtype="bf16", gradient_checkpointing=True)
    check_bf16_velocity_and_gradients(policy, PROMPTS, 3.0)


def test_split_cfg_equals_the_joint_call_or_opts_out(folder):
    """flowpo.guided's recompute/reuse modes call velocity(·, 1.0) twice and `guide`: the same velocity
    (with cfg_normalization); with cfg_truncation < 1 (σ-dependent) the policy opts out."""
    from flowpo.guided import GuidedVelocity

    policy = make(folder, cfg_normalization=1.02)
    perturb_trainable(policy, scale=0.05)
    x = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(9))
    sigma, cond = torch.tensor([0.8, 0.4]), policy.encode_prompts(PROMPTS)
    guided = GuidedVelocity(policy, 4.0, "recompute")
    assert guided.split
    torch.testing.assert_close(guided(x, sigma, cond, keep=True)[0], policy.velocity(x, sigma, cond, 4.0), **TOL)
    assert not GuidedVelocity(make(folder, cfg_truncation=0.5), 4.0, "recompute").split


@pytest.mark.slow
@pytest.mark.ci
def test_zimage_ocr_config_trains_a_tiny_pipeline(folder, tmp_path):
    import yaml

    raw = yaml.safe_load(CONFIG.read_text())
    assert raw["model"]["kind"] == "zimage" and raw["reward"]["names"] == ["ocr"]
    _, rec, moved = tiny_run(raw, tmp_path, [f"model.path={folder}", f"model.resolution={RES}",
                                             f"model.max_sequence_length={SEQ}", *TINY_RUN])
    assert rec["stats/ratio_mean"] == 1.0 and moved
