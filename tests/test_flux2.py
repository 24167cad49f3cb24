"""Flux2Policy on tiny random FLUX.2 [klein] and [dev] pipelines (tests/tiny_pipelines_2026.py), CPU, fp32.

Against each pipeline's own `__call__`: the σ grid during the call (linspace sigmas, μ from
compute_empirical_mu(S, T)), the velocity handed to the scheduler at each step ([klein]: true CFG
with the empty negative prompt; [dev]: the guidance embedding), the decoded images of an ODE
rollout. [dev]'s text inputs: the tokenizer path equals ProcessorMixin's apply_chat_template (what
PixtralProcessor runs for text-only prompts; PixtralProcessor itself needs torchvision) and a folder
whose model_index.json names PixtralProcessor loads. LoRA saved → `load_lora_weights` reproduces
the policy; full mode; the distilled [klein] refuses CFG; the PickScore config trains one iteration.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from pipeline_parity import (TINY_RUN, check_bf16_velocity_and_gradients, euler_rollout,  # noqa: E402
                             one_thread, perturb_trainable, record_call, tiny_run)  # noqa: F401 (a fixture)
from tiny_pipelines import save_tiny  # noqa: E402
from tiny_pipelines_2026 import tiny_flux2_dev_pipeline, tiny_flux2_klein_pipeline  # noqa: E402

from flowpo.policy.registry import build_policy  # noqa: E402

RES, SEQ, LAYERS = 16, 24, (1, 2, 3)
PROMPTS = ["a red cat", "a blue dog on the photo of a sign"]
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "flux2_klein_pickscore.yaml"
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    dev = save_tiny(tiny_flux2_dev_pipeline(seed=0), root / "dev")
    index = Path(dev) / "model_index.json"  # as the real [dev] folder: the tokenizer entry is the processor
    meta = json.loads(index.read_text())
    meta["tokenizer"] = ["transformers", "PixtralProcessor"]
    index.write_text(json.dumps(meta))
    return {"klein": save_tiny(tiny_flux2_klein_pipeline(seed=0), root / "klein"), "dev": dev,
            "distilled": save_tiny(tiny_flux2_klein_pipeline(seed=0, is_distilled=True), root / "distilled"),
            "wrong": _wrong_folder(root / "wrong")}


def _wrong_folder(path: Path) -> str:
    path.mkdir()
    (path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    return str(path)


def make(folder, **options):
    options = {"resolution": RES, "max_sequence_length": SEQ, "text_encoder_out_layers": LAYERS, **options}
    return build_policy("flux2", folder, **options)


def fresh_pipeline(folder):
    import diffusers
    from transformers import AutoTokenizer

    name = json.loads((Path(folder) / "model_index.json").read_text())["_class_name"]
    extra = {"tokenizer": None} if name == "Flux2Pipeline" else {}  # the folder names PixtralProcessor
    pipe = getattr(diffusers, name).from_pretrained(folder, local_files_only=True, **extra)
    if name == "Flux2Pipeline":
        pipe.register_modules(tokenizer=AutoTokenizer.from_pretrained(f"{folder}/tokenizer"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_pipeline(pipe, x, steps, guidance):
    """The pipeline from the policy's latent x [N, 4C, h, w] (its packed tokens)."""
    n, c, h, w = x.shape
    tokens = x.reshape(n, c, h * w).permute(0, 2, 1)
    images, seen = record_call(pipe, lambda: pipe(
        prompt=PROMPTS[:n], height=RES, width=RES, num_inference_steps=steps, guidance_scale=guidance,
        latents=x.clone(), output_type="pt", max_sequence_length=SEQ, text_encoder_out_layers=LAYERS).images)
    assert torch.equal(pipe._pack_latents(x), tokens)  # the pipeline packs as the policy does
    unpack = lambda t: t.permute(0, 2, 1).reshape(n, c, h, w)  # noqa: E731
    return images, [(unpack(v), t, unpack(s), sig) for v, t, s, sig in seen]


@pytest.mark.parametrize("variant,guidance", [("klein", 4.0), ("klein", 1.0), ("dev", 3.5)])
def test_parity_with_the_pipelines_own_call(folders, variant, guidance):
    steps, n = 3, 2
    policy = make(folders[variant])
    assert policy.variant == variant and policy.latent_shape == (16, 4, 4)
    assert policy.evals_per_row(guidance) == (2 if (variant == "klein" and guidance != 1) else 1)
    x = torch.randn(n, *policy.latent_shape, generator=torch.Generator().manual_seed(3))
    images, seen = run_pipeline(fresh_pipeline(folders[variant]), x, steps, guidance)
    ours, vs, sigmas = euler_rollout(policy, PROMPTS[:n], x, steps, guidance)
    torch.testing.assert_close(sigmas, seen[0][3], atol=1e-6, rtol=0)
    cond = policy.encode_prompts(PROMPTS[:n])
    with torch.no_grad():
        for i, (v_pipe, t, x_pipe, _) in enumerate(seen):
            torch.testing.assert_close(policy.velocity(x_pipe, sigmas[i].expand(n), cond, guidance), v_pipe, **TOL)
            torch.testing.assert_close(vs[i], v_pipe, **TOL)
    torch.testing.assert_close(ours, images.float(), **TOL)


def test_grid_mu_depends_on_tokens_and_steps(folders):
    import numpy as np
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu as theirs

    from flowpo.policy.flux2 import compute_empirical_mu

    for s in (16, 1024, 4096, 5000):
        for t in (4, 10, 28, 50):
            assert compute_empirical_mu(s, t) == pytest.approx(theirs(s, t), abs=1e-12)
    policy = make(folders["klein"], resolution=128)  # the tiny VAE compresses 2×: 32 × 32 = 1024 tokens
    assert policy.latent_shape[1:] == (32, 32)
    sched = type(policy.pipe.scheduler).from_config(policy.pipe.scheduler.config)
    for T in (10, 28):
        sched.set_timesteps(sigmas=np.linspace(1, 1 / T, T), mu=theirs(32 * 32, T))
        torch.testing.assert_close(policy.sigmas(T), sched.sigmas.float(), atol=1e-6, rtol=0)
    assert not torch.allclose(policy.sigmas(10)[5], make(folders["klein"], resolution=256).sigmas(10)[5])


def test_dev_text_inputs_are_the_processors_without_torchvision(folders):
    from transformers.processing_utils import ProcessorMixin

    from flowpo.policy.flux2 import mistral_inputs

    policy = make(folders["dev"])  # model_index.json names PixtralProcessor: loaded as a tokenizer
    tok = policy.pipe.tokenizer

    class TextOnly(ProcessorMixin):  # ProcessorMixin's text path, which PixtralProcessor inherits
        def __init__(self, tokenizer=None, chat_template=None):
            super().__init__(tokenizer, chat_template=chat_template)

    messages = [[{"role": "system", "content": [{"type": "text", "text": policy.pipe.system_message}]},
                 {"role": "user", "content": [{"type": "text", "text": p}]}] for p in PROMPTS]
    for template in (tok.chat_template, tok.chat_template.replace("{{ bos_token }}", "")):  # with and without BOS
        tok.chat_template = template
        theirs = TextOnly(tokenizer=tok, chat_template=template).apply_chat_template(
            messages, add_generation_prompt=False, tokenize=True, return_dict=True, return_tensors="pt",
            padding="max_length", truncation=True, max_length=SEQ)
        ours = mistral_inputs(tok, PROMPTS, policy.pipe.system_message, SEQ)
        assert torch.equal(ours["input_ids"], theirs["input_ids"])
        assert (ours["input_ids"][:, 0] == tok.bos_token_id).all()
        assert torch.equal(ours["attention_mask"], theirs["attention_mask"])
    import shutil

    bare = Path(folders["dev"]).parent / "dev_no_template"
    shutil.copytree(folders["dev"], bare)
    for f in bare.glob("tokenizer/chat_template*"):
        f.unlink()
    config = bare / "tokenizer" / "tokenizer_config.json"
    config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "chat_template"}))
    with pytest.raises(ValueError, match="has no chat template"):
        make(str(bare))
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:  # why the detour: the processor needs torchvision
        from diffusers import Flux2Pipeline

        with pytest.raises((ImportError, ValueError), match="torchvision|Pixtral|cannot be loaded"):
            Flux2Pipeline.from_pretrained(folders["dev"], local_files_only=True)


@pytest.mark.parametrize("variant", ["klein", "dev"])
def test_lora_save_then_pipeline_load_lora_weights_reproduces_policy(folders, tmp_path, variant):
    policy = make(folders[variant], lora_rank=4, lora_alpha=8)
    perturb_trainable(policy)
    policy.save_pretrained(str(tmp_path / "lora"))
    pipe = fresh_pipeline(folders[variant])
    pipe.load_lora_weights(str(tmp_path / "lora"))
    x = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(5))
    images, seen = run_pipeline(pipe, x, 2, 4.0)
    ours, vs, _ = euler_rollout(policy, PROMPTS, x, 2, 4.0)
    for v, (v_pipe, *_) in zip(vs, seen):
        torch.testing.assert_close(v, v_pipe, **TOL)
    torch.testing.assert_close(ours, images.float(), **TOL)
    with policy.disable_adapter(), torch.no_grad():
        base = policy.velocity(x, torch.ones(2), policy.encode_prompts(PROMPTS), 4.0)
    assert not torch.allclose(base, seen[0][0], atol=1e-4)


def test_full_mode_distilled_and_errors(folders):
    full = make(folders["klein"], mode="full")
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
    distilled = make(folders["distilled"])
    assert distilled.velocity(x, sigma, cond, 1.0).shape == x.shape
    with pytest.raises(ValueError, match="step-distilled"):
        distilled.velocity(x, sigma, cond, 4.0)
    with pytest.raises(ValueError, match="expects a Flux2Pipeline or Flux2KleinPipeline folder"):
        build_policy("flux2", folders["wrong"])
    with pytest.raises(ValueError, match="text encoder has 3 layers"):
        build_policy("flux2", folders["klein"], resolution=RES)  # the real (9, 18, 27)


def test_bf16_with_checkpointing_returns_fp32_and_finite_gradients(folders):
    policy = make(folders["klein"], dtype="bf16", gradient_checkpointing=True)
    check_bf16_velocity_and_gradients(policy, PROMPTS, 3.0)


def test_split_cfg_equals_the_joint_call_or_is_not_used(folders):
    from flowpo.guided import GuidedVelocity

    policy = make(folders["klein"])
    perturb_trainable(policy, scale=0.05)
    x = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(9))
    sigma, cond = torch.tensor([0.8, 0.4]), policy.encode_prompts(PROMPTS)
    guided = GuidedVelocity(policy, 4.0, "recompute")
    assert guided.split
    torch.testing.assert_close(guided(x, sigma, cond, keep=True)[0], policy.velocity(x, sigma, cond, 4.0), **TOL)
    for variant in ("dev", "distilled"):  # guidance embedding / no CFG: one branch
        assert not GuidedVelocity(make(folders[variant]), 4.0, "recompute").split


@pytest.mark.slow
@pytest.mark.ci
def test_flux2_klein_pickscore_config_trains_a_tiny_pipeline(folders, tmp_path):
    import yaml

    raw = yaml.safe_load(CONFIG.read_text())
    assert raw["model"]["kind"] == "flux2" and raw["reward"]["names"] == ["pickscore"]
    raw["model"]["options"] = {"text_encoder_out_layers": list(LAYERS)}
    _, rec, moved = tiny_run(raw, tmp_path, [f"model.path={folders['klein']}", f"model.resolution={RES}",
                                             f"model.max_sequence_length={SEQ}", *TINY_RUN])
    assert rec["stats/ratio_mean"] == 1.0 and moved
