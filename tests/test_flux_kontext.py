"""FluxKontextPolicy on a tiny random-weight FluxKontextPipeline (tests/tiny_edit_pipelines.py), CPU, offline.

What is checked: the output size from `max_area`; source-image encoding = the pipeline's (resize,
normalise, VAE mode, shift/scale, packing) and cached per (prompt, image); parity with the
pipeline's own `__call__` at fixed noise (σ grid, the velocity handed to the scheduler at every
step with the reference tokens appended at position index 1 and sliced off, the decoded images;
fp32, atol 1e-5); a direct transformer call; LoRA save → `FluxKontextPipeline.load_lora_weights`
reproduces the trained policy's velocity; the lock-step empty call; errors naming their fix.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from tiny_edit_pipelines import tiny_flux_kontext_pipeline, write_source_images  # noqa: E402
from tiny_pipelines import T5_LENGTH, save_tiny  # noqa: E402

from flowpo.errors import ConfigError  # noqa: E402
from flowpo.policy.edit import encode_rows  # noqa: E402
from flowpo.policy.flux import pack_latents, unpack_latents  # noqa: E402
from flowpo.policy.flux_kontext import FluxKontextPolicy, auto_image_size, max_area_size  # noqa: E402
from flowpo.policy.registry import build_policy  # noqa: E402

RES = 16  # px; the tiny VAE compresses 2×: latents [4, 8, 8]; the 16 px source gives 16 reference tokens
PROMPTS = ["a red cat", "a blue dog"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny(tiny_flux_kontext_pipeline(seed=0), tmp_path_factory.mktemp("tiny") / "kontext")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    return [(str(root / name),) for name in write_source_images(root, n=2, size=(RES, RES))]


def make(folder, **options):
    options.setdefault("resolution", RES)
    options.setdefault("max_area", RES * RES)
    options.setdefault("image_resolution", RES)
    options.setdefault("max_sequence_length", T5_LENGTH)
    return build_policy("flux_kontext", folder, **options)


def fresh_pipeline(folder):
    from diffusers import FluxKontextPipeline

    pipe = FluxKontextPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_rollout(pipe, prompts, images, x, steps, guidance):
    """`pipe.__call__` from latents x [N, C, h, w] → (images, the velocity handed to the scheduler at
    each step [N, C, h, w], the latents before each step)."""
    from PIL import Image

    n, c, h, w = x.shape
    seen, step = [], pipe.scheduler.step

    def recording_step(model_output, timestep, sample, **kw):
        seen.append((model_output.clone(), sample.clone()))
        return step(model_output, timestep, sample, **kw)

    pipe.scheduler.step = recording_step
    try:
        out = pipe(image=[Image.open(p[0]).convert("RGB") for p in images], prompt=prompts, height=RES, width=RES,
                   max_area=RES * RES, _auto_resize=False, num_inference_steps=steps, guidance_scale=guidance,
                   latents=pack_latents(x), output_type="pt", max_sequence_length=T5_LENGTH).images
    finally:
        pipe.scheduler.step = step
    return out, [unpack_latents(v, h, w) for v, _ in seen], [unpack_latents(s, h, w) for _, s in seen]


def test_output_and_condition_sizes_are_the_pipelines():
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    from flowpo.policy.flux_kontext import KONTEXT_RESOLUTIONS

    assert tuple(PREFERRED_KONTEXT_RESOLUTIONS) == KONTEXT_RESOLUTIONS
    assert max_area_size(1024, 1024, 512**2, 16) == (512, 512)
    assert max_area_size(720, 1280, 1024**2, 16) == (768, 1360)  # 1365.3 → 1360, 768 = round(768.0)
    assert auto_image_size(600, 800, 16) == (880, 1184)  # 4:3 → the 1184×880 training size
    assert auto_image_size(1000, 1000, 16) == (1024, 1024)


def test_source_encoding_is_the_pipelines_and_cached(folder, sources):
    from PIL import Image

    policy = make(folder)
    cond = encode_rows(policy, PROMPTS + PROMPTS[:1], [{"images": list(s)} for s in sources + sources[:1]])
    assert cond["image_tokens"].shape == (3, 16, 16) and cond["prompt_embeds"].shape[0] == 3
    torch.testing.assert_close(cond["image_tokens"][0], cond["image_tokens"][2])
    assert len(policy._prompts) == 2  # (prompt, image) pairs encoded once
    pipe = fresh_pipeline(folder)
    img = pipe.image_processor.preprocess(Image.open(sources[1][0]).convert("RGB"), RES, RES)
    z = pipe._encode_vae_image(img, generator=None)  # retrieve_latents argmax: the mode, shifted, scaled
    torch.testing.assert_close(cond["image_tokens"][1:2], pipe._pack_latents(z, 1, 4, 8, 8))
    other = encode_rows(policy, PROMPTS[:1], [{"images": list(sources[1])}])  # same text, other image
    assert not torch.equal(other["image_tokens"][0], cond["image_tokens"][0])


@pytest.mark.parametrize("guidance", [2.5])
def test_parity_with_the_pipelines_own_call(folder, sources, guidance):
    """The pipeline's __call__ hands its scheduler the policy's velocity at every step, on the
    policy's σ grid, and decodes to the policy's images (the LoRA, fresh, is the identity)."""
    steps = 3
    policy = make(folder)
    x = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(3))
    pipe = fresh_pipeline(folder)
    images, pipe_vs, pipe_xs = pipeline_rollout(pipe, PROMPTS, sources, x, steps, guidance)
    sigmas = policy.sigmas(steps)
    torch.testing.assert_close(sigmas, pipe.scheduler.sigmas.float(), atol=1e-6, rtol=0)
    cond = policy.encode_prompts(PROMPTS, sources)
    with torch.no_grad():
        xt = x
        for i in range(steps):
            v = policy.velocity(pipe_xs[i], sigmas[i].expand(2), cond, guidance)
            torch.testing.assert_close(v, pipe_vs[i], atol=1e-5, rtol=1e-5)
            xt = xt + (sigmas[i + 1] - sigmas[i]) * policy.velocity(xt, sigmas[i].expand(2), cond, guidance)
        torch.testing.assert_close(policy.decode(xt), images.float(), atol=1e-5, rtol=1e-5)


def test_parity_with_a_direct_transformer_call(folder, sources):
    """Reference tokens appended with position index 1 and sliced off the prediction."""
    from diffusers import FluxKontextPipeline

    policy = make(folder)
    cond = policy.encode_prompts(PROMPTS, sources)
    x, sigma = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.8])
    base = fresh_pipeline(folder).transformer.eval()
    ids = FluxKontextPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32)
    ref_ids = ids.clone()
    ref_ids[:, 0] = 1
    with torch.no_grad():
        out = base(hidden_states=torch.cat([pack_latents(x), cond["image_tokens"]], 1), timestep=sigma,
                   guidance=torch.full((2,), 2.5), pooled_projections=cond["pooled"],
                   encoder_hidden_states=cond["prompt_embeds"], txt_ids=torch.zeros(T5_LENGTH, 3),
                   img_ids=torch.cat([ids, ref_ids]), return_dict=False)[0]
        other_ref = policy.velocity(x, sigma, {**cond, "image_tokens": cond["image_tokens"].flip(0)}, 2.5)
        v = policy.velocity(x, sigma, cond, 2.5)
    torch.testing.assert_close(v, unpack_latents(out[:, :16], 8, 8), atol=1e-6, rtol=1e-6)
    assert (v - other_ref).abs().max() > 1e-4  # the reference tokens change the prediction


def test_lora_save_then_pipeline_load_lora_weights_reproduces_policy(folder, sources, tmp_path):
    policy = make(folder, lora_rank=4, lora_alpha=2.0)
    gen = torch.Generator().manual_seed(1)
    policy.load_trainable_state_dict({k: torch.randn(v.shape, generator=gen) * 0.3
                                      for k, v in policy.trainable_state_dict().items()})
    x = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        trained = policy.velocity(x, torch.ones(2), policy.encode_prompts(PROMPTS, sources), 2.5)
        with policy.disable_adapter():
            base = policy.velocity(x, torch.ones(2), policy.encode_prompts(PROMPTS, sources), 2.5)
    assert (trained - base).abs().max() > 1e-3
    policy.save_pretrained(str(tmp_path / "lora"))
    pipe = fresh_pipeline(folder)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    _, pipe_vs, _ = pipeline_rollout(pipe, PROMPTS, sources, x, 2, 2.5)
    torch.testing.assert_close(pipe_vs[0], trained, atol=1e-5, rtol=1e-5)


def test_empty_lockstep_rows_and_errors(folder, sources, tmp_path):
    policy = make(folder)
    empty = encode_rows(policy, [], [])
    assert empty["image_tokens"].shape == (0, 16, 16)
    with pytest.raises(ConfigError, match="name no source image"):
        encode_rows(policy, PROMPTS, [{}, {"images": list(sources[0])}])
    with pytest.raises(ConfigError, match="one source image per prompt"):
        encode_rows(policy, PROMPTS[:1], [{"images": [sources[0][0], sources[1][0]]}])
    from flowpo import config
    from flowpo.training.trainer import Trainer

    edits = tmp_path / "edits.jsonl"
    edits.write_text(f'{{"prompt": "a red cat", "image": "{sources[0][0]}"}}\n')
    for key, given in (("sample.prompts_file", []), ("eval.prompts_file", [f"sample.prompts_file={edits}"])):
        with pytest.raises(ConfigError, match=f"{key}: model.kind='flux_kontext' edits images, but .* name no source"):
            Trainer(config.load(None, "flow_grpo", ["model.kind=flux_kontext", f"model.path={folder}", *given]),
                    tmp_path / key)
    with pytest.raises(ValueError, match="multiples of 4"):
        make(folder, image_resolution=10)
    auto = make(folder, image_resolution=None)
    assert isinstance(auto, FluxKontextPolicy) and auto.image_hw is None
    assert auto.source_layout(sources[0]) == "a 1024×1024 px source"  # the pipeline's rule for a square
    assert policy.source_layout(sources[0]) == "a 16×16 px source"
    assert policy.source_layout((sources[0][0], sources[1][0])) == "2 sources (Kontext takes one)"


@pytest.mark.slow
@pytest.mark.ci
def test_kontext_edit_config_trains_a_tiny_pipeline(folder, tmp_path):
    """configs/flux1_kontext_edit.yaml with the tiny folder, a tiny CLIP for both rewards and a tiny
    budget: one iteration on .jsonl edit rows; first ratio 1, the LoRA moves, eval records keep the sources."""
    import json
    from pathlib import Path

    import yaml

    from flowpo import config
    from flowpo.training.trainer import Trainer
    from tiny_rewards import tiny_clip_folder

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "flux1_kontext_edit.yaml").read_text())
    assert raw["model"]["kind"] == "flux_kontext" and raw["reward"]["names"] == ["pickscore", "image_consistency"]
    assert raw["sample"]["steps"] == 6 and raw["sample"]["guidance"] == 2.5 and raw["model"]["max_area"] == 512**2
    clip = tiny_clip_folder(tmp_path / "clip")
    raw["reward"]["options"] = {"pickscore": {"path": clip, "device": "cpu"},
                                "image_consistency": {"path": clip, "device": "cpu"}}
    names = write_source_images(tmp_path / "data" / "img", n=2, size=(RES, RES))
    edits = tmp_path / "data" / "edits.jsonl"
    edits.write_text("".join(json.dumps({"prompt": p, "image": f"img/{n}"}) + "\n" for p, n in zip(PROMPTS, names)))
    (tmp_path / "kontext.yaml").write_text(yaml.safe_dump(raw))
    cfg = config.load(str(tmp_path / "kontext.yaml"), None, [
        f"model.path={folder}", "model.lora_rank=4", "model.lora_alpha=8", f"model.resolution={RES}",
        f"model.max_area={RES * RES}", f"model.image_resolution={RES}", f"model.max_sequence_length={T5_LENGTH}",
        "model.gradient_checkpointing=false", "model.dtype=fp32", "model.device=cpu", "train.iterations=1",
        "sample.steps=3", "sample.prompts_per_iteration=2", "sample.group_size=2", "sample.batch_size=4",
        f"sample.prompts_file={edits}", f"eval.prompts_file={edits}", "eval.prompts=2", "eval.samples_per_prompt=1", "eval.steps=2",
        "eval.every=1", "train.minibatches=1", "log.progress=false", "log.tensorboard=false"])
    tr = Trainer(cfg, tmp_path / "run")
    before = {k: v.clone() for k, v in tr.policy.trainable_state_dict().items()}
    tr.run()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "reward_mean" in r]
    assert train and train[0]["stats/ratio_mean"] == 1.0 and "reward/image_consistency" in train[0]
    after = tr.policy.trainable_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    recs = [json.loads(x) for x in (tmp_path / "run" / "evals" / "000001.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and all(Path(r["metadata"]["images"][0]).name in names for r in recs)
    # the trained run samples edits of a source given on the command line, and says when none is given
    from flowpo.cli import main

    src = str(tmp_path / "data" / "img" / names[0])
    assert main(["sample", "--run", str(tmp_path / "run"), "--prompt", "a red cat", "--image", src, "--n", "2",
                 "--out", str(tmp_path / "s.png")]) == 0 and (tmp_path / "s.png").is_file()
    assert main(["sample", "--run", str(tmp_path / "run"), "--prompt", "a red cat", "--n", "2",
                 "--out", str(tmp_path / "t.png")]) == 2
    assert main(["sample", "--run", str(tmp_path / "run"), "--prompt", "a red cat", "--image", str(edits),
                 "--out", str(tmp_path / "t.png")]) == 2


@pytest.mark.slow
def test_replayed_edit_rows_are_encoded_with_their_sources(folder, sources, tmp_path):
    """op_grpo with regenerated tails: replayed rows are re-encoded (update, tail) with their own
    source images; every encoding the policy makes is of a (prompt, source) pair of the prompt file."""
    import json

    from flowpo import config
    from flowpo.training.trainer import Trainer

    edits = tmp_path / "edits.jsonl"
    edits.write_text("".join(json.dumps({"prompt": p, "image": s[0]}) + "\n" for p, s in zip(PROMPTS, sources)))
    cfg = config.load(None, "op_grpo", [
        "model.kind=flux_kontext", f"model.path={folder}", "model.lora_rank=4", "model.lora_alpha=8",
        f"model.resolution={RES}", f"model.max_area={RES * RES}", f"model.image_resolution={RES}",
        f"model.max_sequence_length={T5_LENGTH}", "model.device=cpu", "train.iterations=3", "sample.steps=3",
        "sample.prompts_per_iteration=2", "sample.group_size=2", "sample.batch_size=4", "sample.guidance=2.5",
        f"sample.prompts_file={edits}", f"eval.prompts_file={edits}", "eval.prompts=2", "replay.rule=always", "replay.tail=regenerate", "replay.truncate=sigma",
        "replay.truncate_at=0.7", "eval.every=0", "reward.names=[tiny_pipelines:brightness_reward]",
        "log.progress=false", "log.tensorboard=false"])
    tr = Trainer(cfg, tmp_path / "run")
    seen = []
    encode = tr.policy._prompts._encode
    tr.policy._prompts._encode = lambda keys: (seen.extend(keys), encode(keys))[1]
    tr.policy._prompts._rows.clear()
    tr.run()
    pairs = {(p, (s[0],)) for p, s in zip(PROMPTS, sources)}
    assert seen and set(seen) <= pairs
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("replay/admitted", 0) > 0 and r.get("replay/regenerate_nfe", 0) > 0 for r in rows)


def test_bf16_returns_fp32(folder, sources):
    policy = make(folder, dtype="bf16")
    cond = policy.encode_prompts(PROMPTS, sources)
    v = policy.velocity(torch.randn(2, *policy.latent_shape), torch.tensor([0.3, 0.9]), cond, 2.5)
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
    assert policy.decode(v).dtype == torch.float32
