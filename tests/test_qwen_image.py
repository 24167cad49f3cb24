"""QwenImagePolicy on a tiny random-weight QwenImagePipeline (tests/tiny_pipelines.py), CPU, offline.

What is checked: loading from a saved folder; velocity shape, dtype (fp32), finiteness; the
pipeline's default resolution; prompt encoding = the pipeline's (template dropped, padded rows with
a mask); parity with the pipeline's own `__call__` (true CFG with the negative prompt " " and
its norm rescaling, timestep σ, 2×2 packing, img_shapes, text masks of prompts of different
lengths, the dynamically shifted σ grid, VAE decoding) and with a direct transformer call; the
CFG formula; a rollout decoded to images; LoRA identity at init, disable_adapter = base,
save → `QwenImagePipeline.load_lora_weights` reproduces the policy with α ≠ r; trainable state
round trip; gradients; full mode; errors naming their fix; the OCR config; one training iteration.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from tiny_pipelines import save_tiny, tiny_qwen_image_pipeline  # noqa: E402

from flowpo.policy.base import Policy  # noqa: E402
from flowpo.policy.qwen_image import QwenImagePolicy, pack_latents, rescaled_cfg, unpack_latents  # noqa: E402
from flowpo.policy.registry import POLICY_KINDS, build_policy  # noqa: E402

RES = 16  # px; the tiny VAE compresses 2×: latents [4, 8, 8], 16 packed tokens of 16 channels
SEQ = 24  # text tokens kept per prompt in the tests (the pipeline's default is 512)
PROMPTS = ["a red cat", "a blue dog on the photo of a sign", "a red cat"]  # different token counts
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "qwen_image_ocr.yaml"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny(tiny_qwen_image_pipeline(seed=0), tmp_path_factory.mktemp("tiny") / "qwen_image")


def make(folder, **options):
    options.setdefault("resolution", RES)
    options.setdefault("max_sequence_length", SEQ)
    return build_policy("qwen_image", folder, **options)


def fresh_pipeline(folder):
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inputs(policy, n=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *policy.latent_shape, generator=gen)  # [N, C, h, w]
    sigma = torch.rand(n, generator=gen) * 0.9 + 0.05  # [N]
    return x, sigma, policy.encode_prompts(PROMPTS[:n])


def perturb_trainable(policy, seed=1, scale=0.3):
    gen = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=gen) * scale for k, v in policy.trainable_state_dict().items()}
    policy.load_trainable_state_dict(state)


def pipeline_rollout(pipe, prompts, x, steps, guidance):
    """Run `pipe.__call__` from latents x [N, C, h, w]; return (images [N, 3, H, W], the velocity
    it handed the scheduler at each step as [N, C, h, w], the timesteps, the latents before each step)."""
    from diffusers import QwenImagePipeline

    n, c, h, w = x.shape
    seen = []
    step = pipe.scheduler.step

    def recording_step(model_output, timestep, sample, **kw):
        seen.append((model_output.clone(), timestep.clone(), sample.clone()))
        return step(model_output, timestep, sample, **kw)

    pipe.scheduler.step = recording_step
    try:
        extra = {"negative_prompt": " "} if guidance > 1 else {}
        images = pipe(
            prompts, height=h * pipe.vae_scale_factor, width=w * pipe.vae_scale_factor, num_inference_steps=steps,
            true_cfg_scale=guidance, latents=QwenImagePipeline._pack_latents(x, n, c, h, w), output_type="pt",
            max_sequence_length=SEQ, **extra,
        ).images
    finally:
        pipe.scheduler.step = step
    unpack = lambda t: unpack_latents(t, h, w)  # noqa: E731
    return images, [unpack(v) for v, _, _ in seen], [t for _, t, _ in seen], [unpack(s) for _, _, s in seen]


def policy_rollout(policy, prompts, x, steps, guidance):
    """Euler on the policy's grid (what the pipeline's FlowMatchEuler scheduler does): images, velocities."""
    sigmas = policy.sigmas(steps)
    cond = policy.encode_prompts(prompts)
    vs = []
    with torch.no_grad():
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            v = policy.velocity(x, s.expand(x.shape[0]), cond, guidance)
            vs.append(v)
            x = x + (s_next - s) * v
        return policy.decode(x), vs, sigmas


# -- loading, shapes, dtypes, text ---------------------------------------------------------------


def test_velocity_shape_dtype_and_eval_mode(folder):
    policy = make(folder)
    assert isinstance(policy, Policy) and isinstance(policy, QwenImagePolicy)
    assert policy.latent_shape == (4, 8, 8)
    x, sigma, cond = inputs(policy)
    assert cond["prompt_embeds"].shape == (3, SEQ, 32) and cond["prompt_mask"].shape == (3, SEQ)
    for g in (1.0, 4.0):
        v = policy.velocity(x, sigma, cond, g)
        assert v.shape == x.shape and v.dtype == torch.float32 and torch.isfinite(v).all()
    modules = [m for m in policy.pipe.components.values() if isinstance(m, torch.nn.Module)]
    assert not any(sub.training for m in modules for sub in m.modules())
    assert not any(p.requires_grad for m in (policy.pipe.vae, policy.pipe.text_encoder) for p in m.parameters())
    assert policy.evals_per_row(4.0) == 2 and policy.evals_per_row(1.0) == 1


def test_default_resolution_is_the_pipelines(folder):
    # default_sample_size 128 · vae_scale_factor 2 = 256 px (1024 px with the real 8× VAE).
    policy = make(folder, resolution=None)
    assert (policy.height, policy.width) == (256, 256) and policy.latent_shape == (4, 128, 128)


def test_prompt_rows_are_the_pipelines_encoding_padded_with_a_mask(folder):
    policy = make(folder)
    cond = policy.encode_prompts(PROMPTS)
    embeds, mask = fresh_pipeline(folder).encode_prompt(PROMPTS[:2], device="cpu", max_sequence_length=SEQ)
    lengths = mask.sum(dim=1)
    tok = policy.pipe.tokenizer
    # The template's 34 tokens are dropped: what remains is the prompt and the assistant header.
    suffix = "<|im_end|>\n<|im_start|>assistant\n"
    assert lengths.tolist() == [len(tok(p + suffix)["input_ids"]) for p in PROMPTS[:2]]
    assert cond["prompt_mask"].sum(dim=1).tolist() == lengths.tolist() + [lengths[0].item()]
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(cond["prompt_embeds"][i, :n], embeds[i, :n])
        assert cond["prompt_embeds"][i, n:].abs().sum() == 0 and cond["prompt_mask"][i, n:].sum() == 0
    torch.testing.assert_close(cond["prompt_embeds"][0], cond["prompt_embeds"][2])  # cached row


def test_packing_is_the_pipelines():
    from diffusers import QwenImagePipeline

    x = torch.randn(2, 4, 6, 8)
    tokens = pack_latents(x)
    torch.testing.assert_close(tokens, QwenImagePipeline._pack_latents(x, 2, 4, 6, 8))
    torch.testing.assert_close(unpack_latents(tokens, 6, 8), x)
    unpacked = QwenImagePipeline._unpack_latents(tokens, 12, 16, vae_scale_factor=2)  # [N, C, 1, h, w]
    torch.testing.assert_close(unpacked[:, :, 0], x)


# -- parity with the pipeline --------------------------------------------------------------------


@pytest.mark.parametrize("guidance", [4.0, 1.0])
def test_parity_with_the_pipelines_own_call(folder, guidance):
    """The pipeline's __call__ (true_cfg_scale, negative prompt " ", norm rescaling; prompts of
    different lengths) hands its scheduler the policy's velocity at every step, on the policy's σ
    grid, and decodes to the policy's images. A fresh LoRA is the identity."""
    steps, n = 3, 2
    policy = make(folder)
    x = torch.randn(n, *policy.latent_shape, generator=torch.Generator().manual_seed(3))
    pipe = fresh_pipeline(folder)
    images, pipe_vs, timesteps, pipe_xs = pipeline_rollout(pipe, PROMPTS[:n], x, steps, guidance)
    ours, vs, sigmas = policy_rollout(policy, PROMPTS[:n], x, steps, guidance)

    torch.testing.assert_close(sigmas, pipe.scheduler.sigmas.float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.stack(timesteps).float(), sigmas[:-1] * 1000, atol=1e-3, rtol=0)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0 and abs(sigmas[-2].item() - 0.02) < 1e-6  # shift_terminal
    with torch.no_grad():
        for i in range(steps):  # the pipeline's state at each step, through the policy
            v = policy.velocity(pipe_xs[i], sigmas[i].expand(n), policy.encode_prompts(PROMPTS[:n]), guidance)
            torch.testing.assert_close(v, pipe_vs[i], atol=1e-5, rtol=1e-5)
    for v, pv in zip(vs, pipe_vs):
        torch.testing.assert_close(v, pv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, images.float(), atol=1e-5, rtol=1e-5)


def test_grid_is_the_pipelines_dynamic_shift_at_other_resolutions(folder):
    """σ grid of T steps = the scheduler after the pipeline's set_timesteps (linspace sigmas, μ of
    the packed token count) for several sizes; μ = 0.5 + 0.4·(S − 256)/(8192 − 256)."""
    import numpy as np
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    for res, T in ((RES, 10), (256, 10), (1024, 50)):
        policy = make(folder, resolution=res)
        s = (res // 4) ** 2  # packed tokens: (res/2/2)²
        sched = policy.pipe.scheduler.__class__.from_config(policy.pipe.scheduler.config)
        c = sched.config
        mu = calculate_shift(s, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
        assert abs(mu - (0.5 + 0.4 * (s - 256) / (8192 - 256))) < 1e-9
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / T, T), mu=mu)
        torch.testing.assert_close(policy.sigmas(T), sched.sigmas.float(), atol=1e-6, rtol=0)
        assert policy.sigmas(T).shape == (T + 1,)


def test_parity_with_a_direct_transformer_call(folder):
    from diffusers import QwenImagePipeline

    policy = make(folder)
    x, sigma, cond = inputs(policy, n=2)
    embeds, mask = QwenImagePipeline.from_pretrained(folder, local_files_only=True).encode_prompt(
        PROMPTS[:2], device="cpu", max_sequence_length=SEQ)
    base = QwenImagePipeline.from_pretrained(folder, local_files_only=True).transformer.eval()
    with torch.no_grad():
        out = base(hidden_states=QwenImagePipeline._pack_latents(x, 2, 4, 8, 8), timestep=sigma,
                   encoder_hidden_states=embeds, encoder_hidden_states_mask=mask, img_shapes=[[(1, 4, 4)]] * 2,
                   return_dict=False)[0]
    expected = QwenImagePipeline._unpack_latents(out, RES, RES, vae_scale_factor=2)[:, :, 0]
    torch.testing.assert_close(policy.velocity(x, sigma, cond, 1.0), expected, atol=1e-6, rtol=1e-6)


# -- guidance ------------------------------------------------------------------------------------


def test_cfg_is_one_batched_call_of_the_rescaled_cfg_formula(folder):
    policy = make(folder)
    perturb_trainable(policy)
    x, sigma, cond = inputs(policy)
    g = 4.0
    v_c = policy.velocity(x, sigma, cond, 1.0)
    v_u = policy.velocity(x, sigma, policy.encode_prompts([" "] * 3), 1.0)
    plain = v_u + g * (v_c - v_u)
    # Norm rescaling per packed token (4C = C channels × 2×2 pixels): v = v̂ · ‖v_c‖ / ‖v̂‖.
    expected = unpack_latents(rescaled_cfg(pack_latents(v_u), pack_latents(v_c), g), 8, 8)
    ratio = pack_latents(v_c).norm(dim=-1) / pack_latents(expected).norm(dim=-1)
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(policy.velocity(x, sigma, cond, g), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected, plain, atol=1e-3)
    policy.cfg_norm_rescale = False
    torch.testing.assert_close(policy.velocity(x, sigma, cond, g), plain, atol=1e-5, rtol=1e-5)


def test_cfg_gradient_option(folder):
    grads = {}
    for cfg_grad in ("conditional", "both"):
        policy = make(folder, lora_rank=4, lora_alpha=8, cfg_grad=cfg_grad)
        perturb_trainable(policy)
        x, sigma, cond = inputs(policy)
        weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
        # Not ‖v‖²: the norm rescaling makes ‖v‖ = ‖v_c‖ per token, so that loss ignores v_u.
        (policy.velocity(x, sigma, cond, 4.0) * weights).sum().backward()
        # The last block's text-stream output is discarded: its txt_mlp / to_add_out LoRA get no gradient.
        grads[cfg_grad] = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                                     for p in policy.trainable_parameters()])
    assert grads["conditional"].abs().sum() > 0
    assert not torch.allclose(grads["conditional"], grads["both"])


# -- LoRA ----------------------------------------------------------------------------------------


def test_lora_starts_at_base_and_disable_adapter_gives_base(folder):
    policy = make(folder, lora_rank=4, lora_alpha=8)
    x, sigma, cond = inputs(policy)
    v0 = policy.velocity(x, sigma, cond, 4.0)
    with policy.disable_adapter():
        base = policy.velocity(x, sigma, cond, 4.0)
    torch.testing.assert_close(v0, base)
    perturb_trainable(policy)
    assert not torch.allclose(policy.velocity(x, sigma, cond, 4.0), base, atol=1e-4)
    with policy.disable_adapter():
        torch.testing.assert_close(policy.velocity(x, sigma, cond, 4.0), base)
    assert all(p.requires_grad for p in policy.trainable_parameters())
    names = [n for n, _ in policy.module.named_parameters() if ".lora_A" in n]
    assert len(names) == 2 * 12  # 2 blocks × the 12 default targets


def test_lora_save_then_pipeline_load_lora_weights_reproduces_policy(folder, tmp_path):
    """r 4, α 8 (scale 2): the reloaded pipeline's own __call__ hands its scheduler the policy's velocity."""
    policy = make(folder, lora_rank=4, lora_alpha=8)
    perturb_trainable(policy)
    policy.save_pretrained(str(tmp_path / "lora"))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["transformer.lora_alpha"] == 8 and meta["transformer.r"] == 4

    pipe = fresh_pipeline(folder)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    x = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(5))
    images, pipe_vs, _, pipe_xs = pipeline_rollout(pipe, PROMPTS[:2], x, 2, 4.0)
    ours, vs, _ = policy_rollout(policy, PROMPTS[:2], x, 2, 4.0)
    for v, pv in zip(vs, pipe_vs):
        torch.testing.assert_close(v, pv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, images.float(), atol=1e-5, rtol=1e-5)
    with policy.disable_adapter(), torch.no_grad():
        base = policy.velocity(x, torch.ones(2), policy.encode_prompts(PROMPTS[:2]), 4.0)
    assert not torch.allclose(base, pipe_vs[0], atol=1e-4)  # not vacuous


def test_trainable_state_dict_round_trip_and_full_mode(folder, tmp_path):
    a, b = make(folder, lora_rank=4, lora_alpha=8), make(folder, lora_rank=4, lora_alpha=8)
    perturb_trainable(a)
    b.load_trainable_state_dict(a.trainable_state_dict())
    x, sigma, cond = inputs(a)
    torch.testing.assert_close(a.velocity(x, sigma, cond, 4.0), b.velocity(x, sigma, cond, 4.0))
    with pytest.raises(KeyError, match="does not match"):
        b.load_trainable_state_dict({"nope": torch.zeros(1)})

    full = make(folder, mode="full")
    base = full.velocity(x, sigma, cond, 4.0)
    perturb_trainable(full, scale=0.02)
    assert not torch.allclose(full.velocity(x, sigma, cond, 4.0), base, atol=1e-4)
    with full.disable_adapter():
        torch.testing.assert_close(full.velocity(x, sigma, cond, 4.0), base)
    full.save_pretrained(str(tmp_path / "full"))
    assert (tmp_path / "full" / "transformer" / "config.json").is_file()


def test_a_row_without_text_tokens_runs(folder):
    """flowpo.lockstep's dummy row (a rank without rows under FSDP2) has an all-zero conditioning; at
    guidance 1 (and in split CFG's branch calls) no row of the batch has a text token."""
    policy = make(folder)
    cond = {k: torch.zeros_like(v[:1]) for k, v in policy.encode_prompts(PROMPTS[:1]).items()}
    v = policy.velocity(torch.zeros(1, *policy.latent_shape), torch.full((1,), 0.5), cond, 1.0)
    assert v.shape == (1, *policy.latent_shape) and torch.isfinite(v).all()


def test_bf16_returns_fp32(folder):
    policy = make(folder, dtype="bf16")
    x, sigma, cond = inputs(policy)
    v = policy.velocity(x, sigma, cond, 4.0)
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
    assert all(p.dtype == torch.float32 for p in policy.trainable_parameters())
    images = policy.decode(x)
    assert images.dtype == torch.float32 and images.shape == (3, 3, RES, RES)


# -- errors, registry, config --------------------------------------------------------------------


def test_errors_name_the_fix(folder, tmp_path):
    assert POLICY_KINDS["qwen_image"] == ("flowpo.policy.qwen_image", "QwenImagePolicy")
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match="expects a QwenImagePipeline folder"):
        build_policy("qwen_image", str(other))
    with pytest.raises(ValueError, match="needs model.path"):
        build_policy("qwen_image", None)
    with pytest.raises(ValueError, match="multiples of 4"):
        make(folder, resolution=18)
    with pytest.raises(ValueError, match="1 to 1024 text tokens"):
        make(folder, max_sequence_length=2000)
    with pytest.raises(ValueError, match="matched no module"):
        make(folder, lora_targets=["no_such_layer"])
    with pytest.raises(ValueError, match="guidance_embeds=True"):
        pipe = fresh_pipeline(folder)
        pipe.transformer.register_to_config(guidance_embeds=True)
        QwenImagePolicy(pipe, resolution=RES, max_sequence_length=SEQ)


TINY_RUN = [
    "model.lora_rank=4", "model.lora_alpha=8", f"model.resolution={RES}", f"model.max_sequence_length={SEQ}",
    "model.gradient_checkpointing=false", "model.dtype=fp32", "model.device=cpu", "train.iterations=1",
    "sample.steps=3", "sample.prompts_per_iteration=2", "sample.group_size=2", "sample.batch_size=4",
    "sample.prompts_file=null", "eval.prompts_file=null", "eval.prompts=2", "eval.samples_per_prompt=1",
    "eval.steps=2", "train.minibatches=1", "log.progress=false", "log.tensorboard=false",
]


@pytest.mark.slow
@pytest.mark.ci
def test_ocr_config_trains_a_tiny_pipeline(folder, tmp_path):
    """configs/qwen_image_ocr.yaml, with the tiny folder and a tiny budget (brightness reward instead of
    OCR, whose scorer needs flowpo[ocr]): one iteration with true CFG; first ratio 1, LoRA moves."""
    import yaml

    from flowpo import config
    from flowpo.training.trainer import Trainer

    raw = yaml.safe_load(CONFIG.read_text())
    assert raw["model"]["kind"] == "qwen_image" and raw["reward"]["names"] == ["ocr"]
    assert raw["sample"]["guidance"] == 4.0 and raw["eval"]["steps"] == 50 and raw["model"]["resolution"] == 1024
    raw["reward"] = {"names": ["tiny_pipelines:brightness_reward"], "weights": [1.0]}
    tiny_config = tmp_path / "qwen_image_tiny.yaml"
    tiny_config.write_text(yaml.safe_dump(raw))
    cfg = config.load(str(tiny_config), None, [f"model.path={folder}", *TINY_RUN])
    assert cfg.model.kind == "qwen_image" and cfg.sample.guidance == 4.0
    tr = Trainer(cfg, tmp_path / "run")
    before = {k: v.clone() for k, v in tr.policy.trainable_state_dict().items()}
    rec = tr.train_iteration(0)
    assert rec["stats/ratio_mean"] == 1.0
    after = tr.policy.trainable_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
