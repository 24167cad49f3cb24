"""SD3Policy, FluxPolicy and WanPolicy on tiny random-weight pipelines (tests/tiny_pipelines.py), CPU, offline.

What is checked, per model: loading from a saved folder; velocity shape, dtype (fp32) and
finiteness; parity with a direct call of diffusers' transformer the way its pipeline calls it
(timestep convention, FLUX packing via the pipeline's own helpers); true CFG (SD3) / guidance
embedding (FLUX); a 4-step Euler rollout decoded to images (videos for Wan); LoRA: identity at init,
disable_adapter = base, save → `Pipeline.load_lora_weights` reproduces the policy with α ≠ r;
bf16; full fine-tuning's frozen reference; errors that name their fix.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from tiny_pipelines import T5_LENGTH, save_tiny, tiny_flux_pipeline, tiny_sd3_pipeline, tiny_wan_pipeline  # noqa: E402

from flowpo.policy.base import Policy  # noqa: E402
from flowpo.policy.diffusers_common import PromptCache, require  # noqa: E402
from flowpo.policy.flux import FluxPolicy  # noqa: E402
from flowpo.policy.registry import build_policy  # noqa: E402

RES = 16  # px; the tiny SD3/FLUX VAEs compress 2×, so latents are [4, 8, 8]
WAN_RES, WAN_FRAMES = 32, 5  # the tiny Wan VAE compresses 8× in space, 4× in time: [4, 2, 4, 4]
PROMPTS = ["a red cat", "a blue dog", "a red cat"]
KINDS = ["sd3", "flux", "wan"]
EXPECTED_LATENT = {"sd3": (4, 8, 8), "flux": (4, 8, 8), "wan": (4, 2, 4, 4)}
CFG_KINDS = ["sd3", "wan"]  # true CFG; FLUX uses its guidance embedding


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models are latency-bound: one thread is faster and immune to CPU oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {
        "sd3": save_tiny(tiny_sd3_pipeline(seed=0), root / "sd3"),
        "flux": save_tiny(tiny_flux_pipeline(seed=0), root / "flux"),
        "wan": save_tiny(tiny_wan_pipeline(seed=0), root / "wan"),
    }


def make(kind, folders, **options):
    options.setdefault("resolution", WAN_RES if kind == "wan" else RES)
    if kind == "wan":
        options.setdefault("num_frames", WAN_FRAMES)
    options.setdefault("max_sequence_length", T5_LENGTH)
    return build_policy(kind, folders[kind], **options)


def pipeline_class(kind):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline, WanPipeline

    return {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline, "wan": WanPipeline}[kind]


def inputs(policy, n=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *policy.latent_shape, generator=gen)  # [N, C, h, w] ([N, C, F, h, w] for Wan)
    sigma = torch.rand(n, generator=gen) * 0.9 + 0.05  # [N]
    return x, sigma, policy.encode_prompts(PROMPTS[:n])


def perturb_trainable(policy, seed=1, scale=0.3):
    gen = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=gen) * scale for k, v in policy.trainable_state_dict().items()}
    policy.load_trainable_state_dict(state)


def direct_call(kind, transformer, x, sigma, cond, guidance):
    """The transformer called as the diffusers pipeline calls it, with its own packing helpers."""
    from diffusers import FluxPipeline

    if kind == "sd3":
        return transformer(
            hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=cond["prompt_embeds"],
            pooled_projections=cond["pooled"], return_dict=False,
        )[0]
    if kind == "wan":
        return transformer(
            hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=cond["prompt_embeds"], return_dict=False
        )[0]
    n, c, h, w = x.shape
    out = transformer(
        hidden_states=FluxPipeline._pack_latents(x, n, c, h, w),
        timestep=sigma,
        guidance=torch.full((n,), guidance),
        pooled_projections=cond["pooled"],
        encoder_hidden_states=cond["prompt_embeds"],
        txt_ids=torch.zeros(cond["prompt_embeds"].shape[1], 3),
        img_ids=FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, x.device, x.dtype),
        return_dict=False,
    )[0]
    return FluxPipeline._unpack_latents(out, h * 2, w * 2, vae_scale_factor=2)


# -- loading, shapes, dtypes ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_velocity_shape_dtype_and_eval_mode(kind, folders):
    policy = make(kind, folders)
    assert isinstance(policy, Policy)
    assert policy.latent_shape == EXPECTED_LATENT[kind]
    x, sigma, cond = inputs(policy)
    assert all(t.shape[0] == 3 for t in cond.values())
    v = policy.velocity(x, sigma, cond, 1.0)
    assert v.shape == x.shape and v.dtype == torch.float32 and torch.isfinite(v).all()
    modules = [m for m in policy.pipe.components.values() if isinstance(m, torch.nn.Module)]
    assert not any(sub.training for m in modules for sub in m.modules())
    frozen = [policy.pipe.vae, policy.pipe.text_encoder, getattr(policy.pipe, "text_encoder_2", None)]
    assert not any(p.requires_grad for m in frozen if m is not None for p in m.parameters())


def test_default_resolution_is_the_pipelines(folders):
    # SD3: transformer sample_size (8) · vae_scale_factor (2) = 16 px; FLUX: 128 · 2 = 256 px;
    # Wan: 480×832 px, 81 frames → [4, (81 − 1)/4 + 1, 480/8, 832/8].
    assert make("sd3", folders, resolution=None).latent_shape == (4, 8, 8)
    assert make("flux", folders, resolution=None).latent_shape == (4, 128, 128)
    assert make("wan", folders, resolution=None, num_frames=81).latent_shape == (4, 21, 60, 104)


@pytest.mark.parametrize("kind", KINDS)
def test_parity_with_the_pipelines_transformer_call(kind, folders):
    """A fresh LoRA is the identity, so the policy equals the plain transformer called the way
    the diffusers pipeline calls it (SD3, Wan: timestep σ·1000; FLUX: σ, packed 2×2 tokens)."""
    policy = make(kind, folders)
    x, sigma, cond = inputs(policy)
    base = pipeline_class(kind).from_pretrained(folders[kind], local_files_only=True).transformer.eval()
    with torch.no_grad():
        expected = direct_call(kind, base, x, sigma, cond, guidance=3.5)
    torch.testing.assert_close(policy.velocity(x, sigma, cond, 3.5 if kind == "flux" else 1.0), expected)
    # The scheduler's timesteps are σ·1000, which is what the pipelines hand the transformer.
    scheduler = policy.pipe.scheduler
    scheduler.set_timesteps(4, mu=0.5) if scheduler.config.use_dynamic_shifting else scheduler.set_timesteps(4)
    torch.testing.assert_close(scheduler.timesteps, scheduler.sigmas[:-1] * 1000)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_returns_fp32(kind, folders):
    policy = make(kind, folders, dtype="bf16")
    x, sigma, cond = inputs(policy)
    v = policy.velocity(x, sigma, cond, 2.0)
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
    assert all(p.dtype == torch.float32 for p in policy.trainable_parameters())  # LoRA weights fp32
    images = policy.decode(x)
    assert images.dtype == torch.float32


# -- guidance ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", CFG_KINDS)
def test_cfg_is_one_batched_call_of_the_cfg_formula(kind, folders):
    policy = make(kind, folders)
    perturb_trainable(policy)
    x, sigma, cond = inputs(policy)
    g = 4.5
    v_c = policy.velocity(x, sigma, cond, 1.0)
    v_u = policy.velocity(x, sigma, policy.encode_prompts([""] * 3), 1.0)
    torch.testing.assert_close(policy.velocity(x, sigma, cond, g), v_u + g * (v_c - v_u), atol=1e-4, rtol=1e-4)
    assert policy.evals_per_row(g) == 2 and policy.evals_per_row(1.0) == 1


def test_flux_guidance_goes_through_the_embedding(folders):
    policy = make("flux", folders)
    x, sigma, cond = inputs(policy)
    assert not torch.allclose(policy.velocity(x, sigma, cond, 3.5), policy.velocity(x, sigma, cond, 1.0))
    assert policy.evals_per_row(3.5) == 1


def test_flux_without_guidance_embedding_rejects_guidance(tmp_path):
    policy = FluxPolicy(tiny_flux_pipeline(guidance_embeds=False), resolution=RES, max_sequence_length=T5_LENGTH)
    x, sigma, cond = inputs(policy)
    assert policy.velocity(x, sigma, cond, 1.0).shape == x.shape
    with pytest.raises(ValueError, match="guidance to 1.0"):
        policy.velocity(x, sigma, cond, 3.5)


# -- rollout and decoding ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_euler_rollout_decodes_to_images(kind, folders):
    try:
        from flowpo.sde import ode_step

        def step(x, v, s, s_next):
            return ode_step(x, v, s, s_next, 0.0).sample
    except ImportError:  # flowpo.sde not written yet: the Euler step x' = x + (σ' − σ)·v

        def step(x, v, s, s_next):
            return x + (s_next - s).reshape(-1, *[1] * (x.dim() - 1)) * v

    policy = make(kind, folders)
    n = 2
    x = torch.randn(n, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    cond = policy.encode_prompts(PROMPTS[:n])
    sigmas = torch.linspace(1.0, 0.0, 5)
    with torch.no_grad():
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            v = policy.velocity(x, s.expand(n), cond, 3.0)
            x = step(x, v, s.expand(n), s_next.expand(n))
        images = policy.decode(x)
    expected = (n, 3, WAN_FRAMES, WAN_RES, WAN_RES) if kind == "wan" else (n, 3, RES, RES)
    assert images.shape == expected and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1


# -- LoRA ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_lora_starts_at_base_and_disable_adapter_gives_base(kind, folders):
    policy = make(kind, folders, lora_rank=4, lora_alpha=8)
    x, sigma, cond = inputs(policy)
    v0 = policy.velocity(x, sigma, cond, 2.0)
    with policy.disable_adapter():
        base = policy.velocity(x, sigma, cond, 2.0)
    torch.testing.assert_close(v0, base)
    perturb_trainable(policy)
    assert not torch.allclose(policy.velocity(x, sigma, cond, 2.0), base, atol=1e-4)
    with policy.disable_adapter():
        torch.testing.assert_close(policy.velocity(x, sigma, cond, 2.0), base)
        assert len(policy.trainable_state_dict()) == len(policy.trainable_parameters()) > 0
    assert all(p.requires_grad for p in policy.trainable_parameters())
    assert not torch.allclose(policy.velocity(x, sigma, cond, 2.0), base, atol=1e-4)  # re-enabled on exit


@pytest.mark.parametrize("kind", KINDS)
def test_lora_save_then_pipeline_load_lora_weights_reproduces_policy(kind, folders, tmp_path):
    """r = 4, α = 8: scale α/r = 2. Without the saved LoRA config diffusers would reload at scale 1."""
    policy = make(kind, folders, lora_rank=4, lora_alpha=8)
    perturb_trainable(policy)
    x, sigma, cond = inputs(policy)
    g = 3.5 if kind == "flux" else 1.0
    expected = policy.velocity(x, sigma, cond, g)
    policy.save_pretrained(str(tmp_path / "lora"))

    from safetensors import safe_open

    with safe_open(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["transformer.lora_alpha"] == 8 and meta["transformer.r"] == 4

    fresh = pipeline_class(kind).from_pretrained(folders[kind], local_files_only=True)
    fresh.load_lora_weights(str(tmp_path / "lora"))
    with torch.no_grad():
        reloaded = direct_call(kind, fresh.transformer.eval(), x, sigma, cond, guidance=g)
    torch.testing.assert_close(reloaded, expected, atol=1e-5, rtol=1e-5)
    with policy.disable_adapter():
        assert not torch.allclose(policy.velocity(x, sigma, cond, g), expected, atol=1e-4)  # not vacuous


def test_trainable_state_dict_round_trip(folders):
    a, b = make("sd3", folders, lora_rank=4, lora_alpha=8), make("sd3", folders, lora_rank=4, lora_alpha=8)
    perturb_trainable(a)
    b.load_trainable_state_dict(a.trainable_state_dict())
    x, sigma, cond = inputs(a)
    torch.testing.assert_close(a.velocity(x, sigma, cond, 4.5), b.velocity(x, sigma, cond, 4.5))
    with pytest.raises(KeyError, match="does not match"):
        b.load_trainable_state_dict({"nope": torch.zeros(1)})


def test_gradients_reach_lora_and_checkpointing_does_not_change_them(folders):
    grads = []
    for checkpointing in (False, True):
        policy = make("sd3", folders, lora_rank=4, lora_alpha=8, gradient_checkpointing=checkpointing)
        perturb_trainable(policy)
        x, sigma, cond = inputs(policy)
        policy.velocity(x, sigma, cond, 4.5).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in policy.trainable_parameters()]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])


def test_full_mode_reference_is_a_frozen_copy(folders, tmp_path):
    policy = make("sd3", folders, mode="full")
    x, sigma, cond = inputs(policy)
    base = policy.velocity(x, sigma, cond, 4.5)
    assert len(policy.trainable_parameters()) == len(list(policy.module.parameters()))
    perturb_trainable(policy, scale=0.02)
    assert not torch.allclose(policy.velocity(x, sigma, cond, 4.5), base, atol=1e-4)
    with policy.disable_adapter():
        torch.testing.assert_close(policy.velocity(x, sigma, cond, 4.5), base)
    policy.save_pretrained(str(tmp_path / "full"))
    assert (tmp_path / "full" / "transformer" / "config.json").is_file()


# -- prompt cache --------------------------------------------------------------------------------


def test_prompt_embeddings_are_cached_per_prompt(folders):
    policy = make("sd3", folders)
    calls = []
    encode = policy._encode
    policy._prompts = PromptCache(lambda ps: calls.append(list(ps)) or encode(ps), capacity=2)
    cond = policy.encode_prompts(PROMPTS)  # "a red cat" twice: encoded once
    assert calls == [["a red cat", "a blue dog"]]
    torch.testing.assert_close(cond["prompt_embeds"][0], cond["prompt_embeds"][2])
    again = policy.encode_prompts(["a blue dog"])
    assert len(calls) == 1
    torch.testing.assert_close(again["prompt_embeds"][0], cond["prompt_embeds"][1])
    policy.encode_prompts(["a photo", "the cat"])  # capacity 2: older prompts evicted
    assert len(policy._prompts) == 2
    with pytest.raises(TypeError, match="list of prompts"):
        policy.encode_prompts("a cat")


# -- errors and registry -------------------------------------------------------------------------


def test_errors_name_the_fix(folders, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_policy("sd3", str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a diffusers pipeline folder; expected model_index.json"):
        build_policy("flux", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="allowed: embedded, flux, flux_kontext, qwen_image, qwen_image_edit, sd3, wan"):
        build_policy("sdxl", folders["sd3"])
    with pytest.raises(ValueError, match="expects a FluxPipeline folder"):
        build_policy("flux", folders["sd3"])
    with pytest.raises(ValueError, match="needs model.path"):
        build_policy("sd3", None)
    with pytest.raises(ImportError, match=r"pip install flowpo\[diffusers\]"):
        require("flowpo_no_such_dependency")
    with pytest.raises(ValueError, match="'fp32', 'bf16', 'fp16'"):
        make("sd3", folders, dtype="int8")
    with pytest.raises(ValueError, match="multiples of 4"):
        make("flux", folders, resolution=18)
    with pytest.raises(ValueError, match="must be a multiple of 4"):
        make("wan", folders, num_frames=6)
    with pytest.raises(ValueError, match="matched no module"):
        make("sd3", folders, lora_targets=["no_such_layer"])


def test_registry_imports_are_lazy():
    code = "import sys, flowpo.policy.registry; assert 'diffusers' not in sys.modules and 'peft' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_flowpo_train_runs_on_a_tiny_pipeline(kind, folders, tmp_path):
    """`flowpo train` end to end on a tiny folder; the first update's ratio is exactly 1."""
    import os
    from pathlib import Path

    tests_dir = str(Path(__file__).parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "run"
    args = [
        sys.executable, "-m", "flowpo", "train", "--preset", "flow_grpo", "--out", str(out),
        f"model.kind={kind}", f"model.path={folders[kind]}", "model.lora_rank=4", "model.lora_alpha=8",
        f"model.resolution={RES}", "train.iterations=2", "eval.every=1", "eval.prompts=2",
        "eval.samples_per_prompt=1", "eval.steps=3", "sample.steps=4", "sample.prompts_per_iteration=2",
        "sample.group_size=2", f"sample.guidance={3.5 if kind == 'flux' else 2.0}",
        "reward.names=[tiny_pipelines:brightness_reward]", "log.progress=false", "train.threads=1",
    ]
    subprocess.run(args, check=True, env=env, cwd=tmp_path)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [line for line in lines if "reward_mean" in line]
    assert len(train) == 2 and train[0]["stats/ratio_mean"] == 1.0


@pytest.mark.parametrize("kind", ["sd3", "flux"])
@pytest.mark.parametrize("preset", ["flow_grpo", "dance_grpo", "mix_grpo_flash", "op_grpo", "stepwise_grpo"])
def test_every_preset_trains_a_tiny_pipeline_unchanged(kind, preset, folders, tmp_path):
    """The presets run on the diffusers adapters with no change (the adapters hold no RL logic):
    one iteration, one minibatch, so the first ratio is exactly 1 and the LoRA weights move."""
    from flowpo import config
    from flowpo.training.trainer import Trainer

    cfg = config.load(None, preset, [
        f"model.kind={kind}", f"model.path={folders[kind]}", "model.lora_rank=4", "model.lora_alpha=8",
        f"model.resolution={RES}", "eval.prompts=2", "eval.samples_per_prompt=1", "eval.steps=3",
        "sample.steps=4", "sample.prompts_per_iteration=2", "sample.group_size=3", "sample.batch_size=6",
        f"sample.guidance={3.5 if kind == 'flux' else 2.0}", "reward.names=[tiny_pipelines:brightness_reward]",
        "train.minibatches=1", "train.weight_decay=0", "advantage.substeps=2", "plan.window_size=2",
        "log.progress=false", "log.tensorboard=false"])
    tr = Trainer(cfg, tmp_path / "run")
    before = {k: v.clone() for k, v in tr.policy.trainable_state_dict().items()}
    rec = tr.train_iteration(0)
    assert rec["stats/ratio_mean"] == 1.0 and rec["stats/ratio_max"] == 1.0
    after = tr.policy.trainable_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
