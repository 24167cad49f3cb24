"""QwenImageEditPolicy on tiny random-weight QwenImageEditPlusPipelines (
tests/tiny_edit_pipelines.py: the 2509 layout and the 2511 one, zero_cond_t), CPU, offline.

What is checked: Qwen2-VL's image inputs prepared on tensors equal transformers'
Qwen2VLImageProcessor (PIL backend) exactly, and the image-pad expansion equals Qwen2VLProcessor's
own __call__ (built here without its torchvision video processor), plus a hand-computed case;
loading a folder without building the processor; parity with the pipeline's own `__call__` at
fixed noise (σ grid; the velocity handed to the scheduler at every step with true CFG renormalised
to the conditional norm, the negative prompt " " encoded with the sources; the decoded images;
fp32, atol 1e-5), with one and two source images and the 2511 layout; LoRA save →
`QwenImageEditPlusPipeline.load_lora_weights` reproduces the trained velocity; errors; and
configs/qwen_image_edit_2511.yaml trains one iteration (ci).

The pipeline's source areas (CONDITION_IMAGE_SIZE 384², VAE_IMAGE_SIZE 1024²) are module constants;
the tests set them to 32² px in the pipeline and give the policy the same (vl_area, image_resolution 32).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from tiny_edit_pipelines import (  # noqa: E402
    QWEN_EDIT_PROCESSOR, qwen_vl_processor, save_tiny_qwen_edit, tiny_qwen_image_edit_pipeline, write_source_images,
)

from flowpo.errors import ConfigError  # noqa: E402
from flowpo.policy.edit import encode_rows  # noqa: E402
from flowpo.policy.qwen_image import pack_latents, unpack_latents  # noqa: E402
from flowpo.policy.qwen_image_edit import QwenImageEditPolicy, calculate_dimensions  # noqa: E402
from flowpo.policy.qwen_vl_inputs import VLImageConfig, expand_image_pads, image_inputs, smart_resize  # noqa: E402
from flowpo.policy.registry import build_policy  # noqa: E402

RES = 16      # px output; the tiny VAE compresses 2×: latents [4, 8, 8]
AREA = 32 * 32  # the sources' VL and VAE areas in the tests: 32×32 px (64 packed tokens, 64 vision tokens)
SEQ = 200
PROMPT = "make it red"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {"2509": save_tiny_qwen_edit(tiny_qwen_image_edit_pipeline(seed=0), root / "edit2509"),
            "2511": save_tiny_qwen_edit(tiny_qwen_image_edit_pipeline(seed=0, zero_cond_t=True), root / "edit2511")}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    return [str(root / n) for n in write_source_images(root, n=2, size=(32, 32))]


@pytest.fixture
def small_areas(monkeypatch):
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as plus

    monkeypatch.setattr(plus, "CONDITION_IMAGE_SIZE", AREA)
    monkeypatch.setattr(plus, "VAE_IMAGE_SIZE", AREA)


def make(folder, **options):
    options.setdefault("resolution", RES)
    options.setdefault("max_sequence_length", SEQ)
    options.setdefault("vl_area", AREA)
    options.setdefault("image_resolution", 32)
    return build_policy("qwen_image_edit", folder, **options)


def fresh_pipeline(folder):
    from diffusers import QwenImageEditPlusPipeline

    pipe = QwenImageEditPlusPipeline.from_pretrained(folder, processor=None, local_files_only=True)
    pipe.processor = qwen_vl_processor(pipe.tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_rollout(pipe, prompt, paths, x, steps, guidance):
    """`pipe.__call__` (batch 1, as the Plus pipeline allows) from latents x [1, C, h, w] → (images,
    the velocity handed to the scheduler at each step, the latents before each step)."""
    from PIL import Image

    n, c, h, w = x.shape
    seen, step = [], pipe.scheduler.step

    def recording_step(model_output, timestep, sample, **kw):
        seen.append((model_output.clone(), sample.clone()))
        return step(model_output, timestep, sample, **kw)

    pipe.scheduler.step = recording_step
    try:
        out = pipe(image=[Image.open(p).convert("RGB") for p in paths], prompt=prompt, negative_prompt=" ",
                   true_cfg_scale=guidance, height=RES, width=RES, num_inference_steps=steps,
                   latents=pack_latents(x), output_type="pt").images
    finally:
        pipe.scheduler.step = step
    return out, [unpack_latents(v, h, w) for v, _ in seen], [unpack_latents(s, h, w) for _, s in seen]


# -- Qwen2-VL image inputs without the processor ---------------------------------------------------


def test_vl_image_inputs_equal_the_image_processor_and_the_processor():
    from PIL import Image

    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((30, 41), (64, 20))]
    tok = tiny_qwen_image_edit_pipeline().tokenizer
    proc = qwen_vl_processor(tok)
    cfg = VLImageConfig(**{k: QWEN_EDIT_PROCESSOR[k] for k in ("patch_size", "merge_size", "temporal_patch_size",
                                                                "min_pixels", "max_pixels")})
    pixels, grid = image_inputs(imgs, cfg)
    ref = proc.image_processor(images=imgs, return_tensors="pt")
    assert torch.equal(grid, ref["image_grid_thw"])
    torch.testing.assert_close(pixels, ref["pixel_values"].float(), atol=0, rtol=0)
    text = "Picture 1: <|vision_start|><|image_pad|><|vision_end|>Picture 2: <|vision_start|><|image_pad|><|vision_end|>x"
    ours = tok([expand_image_pads(text, grid, cfg.merge_size)], return_tensors="pt")["input_ids"]
    assert torch.equal(ours, proc(text=[text], images=imgs, padding=True, return_tensors="pt")["input_ids"])
    # at the real sizes: 384² → 392² (28-multiples), a 28×28 grid of 14 px patches → 196 vision tokens
    real = VLImageConfig(min_pixels=3136, max_pixels=12845056)
    assert smart_resize(384, 384, 28, real.min_pixels, real.max_pixels) == (392, 392)
    big = Image.new("RGB", (384, 384), (10, 200, 30))
    p, g = image_inputs([big], real)
    assert g.tolist() == [[1, 28, 28]] and p.shape == (784, 3 * 2 * 14 * 14)
    mean, std = torch.tensor(real.mean), torch.tensor(real.std)
    expected = ((torch.tensor([10, 200, 30]).double() / 255).float() - mean) / std  # a flat colour: every patch value
    torch.testing.assert_close(p.view(784, 3, 2, 14 * 14)[..., 0, 0], expected.expand(784, 3), atol=1e-6, rtol=0)
    assert expand_image_pads("a<|image_pad|>b", g, 2).count("<|image_pad|>") == 196
    assert calculate_dimensions(VAE := 1024 * 1024, 1.0) == (1024, 1024) and calculate_dimensions(VAE, 4 / 3) == (1184, 896)


# -- parity with the pipeline --------------------------------------------------------------------


@pytest.mark.parametrize("layout,n_src,guidance", [("2509", 1, 4.0), ("2511", 1, 4.0), ("2511", 2, 4.0),
                                                    ("2511", 1, 1.0)])
def test_parity_with_the_pipelines_own_call(folders, sources, small_areas, layout, n_src, guidance):
    """The pipeline's __call__ hands its scheduler the policy's velocity at every step, on the
    policy's σ grid (μ from the noise tokens), and decodes to the policy's images."""
    steps = 3
    policy = make(folders[layout])
    paths = sources[:n_src]
    x = torch.randn(1, *policy.latent_shape, generator=torch.Generator().manual_seed(3))
    pipe = fresh_pipeline(folders[layout])
    images, pipe_vs, pipe_xs = pipeline_rollout(pipe, PROMPT, paths, x, steps, guidance)
    sigmas = policy.sigmas(steps)
    torch.testing.assert_close(sigmas, pipe.scheduler.sigmas.float(), atol=1e-6, rtol=0)
    cond = encode_rows(policy, [PROMPT], [{"images": paths}])
    assert cond["image_tokens"].shape == (1, 64 * n_src, 16)
    with torch.no_grad():
        xt = x
        for i in range(steps):
            v = policy.velocity(pipe_xs[i], sigmas[i].expand(1), cond, guidance)
            torch.testing.assert_close(v, pipe_vs[i], atol=1e-5, rtol=1e-5)
            xt = xt + (sigmas[i + 1] - sigmas[i]) * policy.velocity(xt, sigmas[i].expand(1), cond, guidance)
        torch.testing.assert_close(policy.decode(xt), images.float(), atol=1e-5, rtol=1e-5)


def test_the_2511_layout_changes_the_prediction(folders, sources):
    """Same weights, zero_cond_t on: the reference tokens run at t = 0, so the velocity differs."""
    a, b = make(folders["2509"]), make(folders["2511"])
    x = torch.randn(1, *a.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        va = a.velocity(x, torch.tensor([0.6]), a.encode_prompts([PROMPT], [(sources[0],)]), 1.0)
        vb = b.velocity(x, torch.tensor([0.6]), b.encode_prompts([PROMPT], [(sources[0],)]), 1.0)
    assert (va - vb).abs().max() > 1e-4


def test_lora_save_then_pipeline_load_lora_weights_reproduces_policy(folders, sources, small_areas, tmp_path):
    policy = make(folders["2511"], lora_rank=4, lora_alpha=2.0)
    gen = torch.Generator().manual_seed(1)
    policy.load_trainable_state_dict({k: torch.randn(v.shape, generator=gen) * 0.3
                                      for k, v in policy.trainable_state_dict().items()})
    x = torch.randn(1, *policy.latent_shape, generator=torch.Generator().manual_seed(3))
    cond = policy.encode_prompts([PROMPT], [(sources[0],)])
    with torch.no_grad():
        trained = policy.velocity(x, torch.ones(1), cond, 4.0)
        with policy.disable_adapter():
            base = policy.velocity(x, torch.ones(1), cond, 4.0)
    assert (trained - base).abs().max() > 1e-3
    policy.save_pretrained(str(tmp_path / "lora"))
    pipe = fresh_pipeline(folders["2511"])
    pipe.load_lora_weights(str(tmp_path / "lora"))
    _, pipe_vs, _ = pipeline_rollout(pipe, PROMPT, [sources[0]], x, 2, 4.0)
    torch.testing.assert_close(pipe_vs[0], trained, atol=1e-5, rtol=1e-5)


def test_cache_empty_rows_and_errors(folders, sources, tmp_path):
    from PIL import Image

    policy = make(folders["2511"])
    assert isinstance(policy, QwenImageEditPolicy) and policy.vl.patch_size == QWEN_EDIT_PROCESSOR["patch_size"]
    cond = policy.encode_prompts([PROMPT, PROMPT, "a blue dog"], [(sources[0],), (sources[0],), (sources[1],)])
    assert len(policy._prompts) == 2 and torch.equal(cond["prompt_embeds"][0], cond["prompt_embeds"][1])
    assert policy.encode_prompts([], [])["image_tokens"].shape == (0, 64, 16)
    wide = tmp_path / "wide.png"
    Image.new("RGB", (96, 32)).save(wide)  # 3:1 → a 64×32 px VAE source, not 32×32
    with pytest.raises(ConfigError, match="same number of source images with the same aspect ratios"):
        policy.encode_prompts([PROMPT], [(str(wide),)])
    assert policy.source_layout((sources[0],)) == "1 source(s) of 32×32 px"
    assert policy.source_layout((str(wide), sources[0])) == "2 source(s) of 64×32, 32×32 px"
    from flowpo.policy.edit import check_layouts
    from flowpo.prompts import PromptSet

    rows = PromptSet(["a", "b"], [{"images": [sources[0]]}, {"images": [sources[1]]}])
    check_layouts(policy, [("sample.prompts_file", rows)])  # same layout: fine
    bad = PromptSet(["c"], [{"images": [str(wide)]}])
    with pytest.raises(ConfigError, match=r"eval.prompts_file: the sources of 'c' give the model 1 source\(s\) of "
                                          r"64×32 px, but those of 'a' \(sample.prompts_file\) give"):
        check_layouts(policy, [("sample.prompts_file", rows), ("eval.prompts_file", bad)])
    with pytest.raises(ConfigError, match="more than model.max_sequence_length=40"):
        make(folders["2511"], max_sequence_length=40).encode_prompts([PROMPT], [(sources[0],)])
    with pytest.raises(ConfigError, match="name no source image"):
        encode_rows(policy, [PROMPT], [{}])


@pytest.mark.slow
@pytest.mark.ci
def test_qwen_image_edit_2511_config_trains_a_tiny_pipeline(folders, sources, tmp_path):
    """configs/qwen_image_edit_2511.yaml with the tiny 2511 folder, a tiny CLIP for the edit reward,
    tiny sizes: one iteration on .jsonl edit rows with true CFG; first ratio 1, the LoRA moves."""
    import yaml

    from flowpo import config
    from flowpo.training.trainer import Trainer
    from tiny_rewards import tiny_clip_folder

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "qwen_image_edit_2511.yaml").read_text())
    assert raw["model"]["kind"] == "qwen_image_edit" and "image_consistency" in raw["reward"]["names"]
    clip = tiny_clip_folder(tmp_path / "clip")
    raw["reward"]["options"] = {name: {"path": clip, "device": "cpu"} for name in raw["reward"]["names"]}
    edits = tmp_path / "edits.jsonl"
    edits.write_text("".join(json.dumps({"prompt": p, "image": s}) + "\n" for p, s in zip([PROMPT, "a blue dog"], sources)))
    (tmp_path / "edit.yaml").write_text(yaml.safe_dump(raw))
    cfg = config.load(str(tmp_path / "edit.yaml"), None, [
        f"model.path={folders['2511']}", "model.lora_rank=4", "model.lora_alpha=8", f"model.resolution={RES}",
        "model.max_sequence_length=400", "model.image_resolution=32", "model.gradient_checkpointing=false", "model.dtype=fp32",
        "model.device=cpu", "train.iterations=1", "sample.steps=3", "sample.prompts_per_iteration=2",
        "sample.group_size=2", "sample.batch_size=4", f"sample.prompts_file={edits}", f"eval.prompts_file={edits}", "eval.every=0",
        "train.minibatches=1", "log.progress=false", "log.tensorboard=false"])
    assert cfg.sample.guidance == raw["sample"]["guidance"] > 1
    tr = Trainer(cfg, tmp_path / "run")
    before = {k: v.clone() for k, v in tr.policy.trainable_state_dict().items()}
    rec = tr.train_iteration(0)
    assert rec["stats/ratio_mean"] == 1.0 and "reward/image_consistency" in rec
    after = tr.policy.trainable_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_bf16_returns_fp32(folders, sources):
    policy = make(folders["2511"], dtype="bf16")
    cond = policy.encode_prompts([PROMPT], [tuple(sources)])
    assert cond["image_tokens"].shape == (1, 128, 16)
    for g in (1.0, 4.0):
        v = policy.velocity(torch.randn(1, *policy.latent_shape), torch.tensor([0.5]), cond, g)
        assert v.dtype == torch.float32 and torch.isfinite(v).all()


@pytest.mark.parametrize("layout", ["2509", "2511"])
def test_split_cfg_equals_the_joint_velocity(folders, sources, layout):
    """flowpo.guided's two forwards (the negative with each row's own sources) give the policy's
    joint CFG velocity: the update's reuse of the rollout's unconditional outputs is the same math."""
    from flowpo.guided import GuidedVelocity

    p = make(folders[layout])
    x = torch.randn(2, *p.latent_shape, generator=torch.Generator().manual_seed(1))
    cond = p.encode_prompts([PROMPT, "make it blue"], [(sources[0],), (sources[1],)])
    sig = torch.tensor([0.7, 0.4])
    with torch.no_grad():
        joint = p.velocity(x, sig, cond, 4.0)
        split, v_u = GuidedVelocity(p, 4.0, "reuse")(x, sig, cond, keep=True)
        plain_negative = p.velocity(x, sig, {**cond, "prompt_embeds": cond["negative_embeds"],
                                             "prompt_mask": cond["negative_mask"]}, 1.0)
    assert torch.allclose(split, joint, atol=1e-5)
    assert torch.equal(v_u, plain_negative)
