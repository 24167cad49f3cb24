"""The model scorers on tiny random-weight models saved to disk and loaded through the user's path
(`get_scorer(name, **options)`), the scorer wrapper (options, metadata, videos, batching), and the
OCR reward with the real RapidOCR engine on text rendered with PIL."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from flowpo.errors import ConfigError
from flowpo.rewards import RewardSet, get_scorer
from tiny_rewards import tiny_aesthetic_head, tiny_clip_folder

PROMPTS = ["a red cat", "a dog on the sofa", "two blue birds"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return tiny_clip_folder(tmp_path_factory.mktemp("clip") / "clip", image_size=32)


def _images(n=3, h=48, w=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 6, 5, generator=g)  # smooth images, as decoded samples are
    return torch.nn.functional.interpolate(base, size=(h, w), mode="bilinear", align_corners=False)


def _reference_features(clip_dir, images, prompts):
    """The transformers reference path: uint8 PIL images through the saved processor, then
    CLIPModel → normalised image and text features."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval()
    proc = CLIPProcessor.from_pretrained(clip_dir, local_files_only=True)
    pil = [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for im in images]
    inp = proc(text=prompts, images=pil, return_tensors="pt", padding="max_length", truncation=True, max_length=77)
    with torch.no_grad():
        scale = float(model.logit_scale.exp())
        fi = model.get_image_features(pixel_values=inp["pixel_values"])
        ft = model.get_text_features(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"])
    fi, ft = getattr(fi, "pooler_output", fi), getattr(ft, "pooler_output", ft)
    norm = torch.nn.functional.normalize
    return norm(fi, dim=-1), norm(ft, dim=-1), scale, inp["pixel_values"]


def test_tensor_preprocessing_matches_the_processors_pil_path(clip_dir):
    """Batched tensor preprocessing vs CLIPImageProcessor on uint8 PIL images: the pixels agree to
    1.5/255 in [0, 1] units (PIL's rounding between its two resize passes), and the cosines to 2e-3."""
    s = get_scorer("pickscore", path=clip_dir, scaling="raw", device="cpu")
    images = _images(3, 48, 40)
    fi, ft, scale, ref_pix = _reference_features(clip_dir, images, PROMPTS)
    ours = s.fn.pixels(images)
    std = torch.tensor(s.fn.std).view(1, 3, 1, 1)
    assert ours.shape == ref_pix.shape
    assert float(((ours - ref_pix) * std).abs().max()) <= 1.5 / 255 + 1e-6
    want = scale * (fi * ft).sum(-1)
    assert torch.allclose(s(images, PROMPTS), want, atol=2e-3 * scale)  # cosines within 2e-3
    wide = _images(3, 40, 64, seed=1)  # landscape: shortest side → size, then the centre crop
    fi, ft, scale, ref_pix = _reference_features(clip_dir, wide, PROMPTS)
    assert float(((s.fn.pixels(wide) - ref_pix) * std).abs().max()) <= 1.5 / 255 + 1e-6
    assert torch.allclose(s(wide, PROMPTS), scale * (fi * ft).sum(-1), atol=2e-3 * scale)


def test_pickscore_scalings_and_clipscore(clip_dir):
    images = _images()
    fi, ft, scale, _ = _reference_features(clip_dir, images, PROMPTS)
    cos = (fi * ft).sum(-1)
    got = {k: get_scorer("pickscore", path=clip_dir, scaling=k, device="cpu")(images, PROMPTS)
           for k in ("flow_grpo", "mix_grpo", "cosine", "raw")}
    tol = dict(atol=2e-3 * scale)
    assert torch.allclose(got["raw"], scale * cos, **tol)
    assert torch.allclose(got["flow_grpo"], got["raw"] / 26, atol=1e-6)
    assert torch.allclose(got["mix_grpo"], (got["raw"] - 18) / 8, atol=1e-6)
    assert torch.allclose(got["cosine"], cos, atol=2e-3)
    hessel = get_scorer("clipscore", path=clip_dir, device="cpu")(images, PROMPTS)
    assert torch.allclose(hessel, 2.5 * cos.clamp_min(0), atol=5e-3)
    fg = get_scorer("clipscore", path=clip_dir, scaling="flow_grpo", device="cpu")(images, PROMPTS)
    assert torch.allclose(fg, scale * cos / 30, atol=2e-3)
    # the prompt matters: a different prompt moves the score
    assert not torch.allclose(got["raw"], get_scorer("pickscore", path=clip_dir, scaling="raw",
                                                     device="cpu")(images, PROMPTS[::-1]))


def test_aesthetic_head_loads_the_laion_layout_strictly(clip_dir, tmp_path):
    images = _images()
    head = tiny_aesthetic_head(tmp_path / "head.pth", dim=24)
    got = get_scorer("aesthetic", path=clip_dir, head=head, device="cpu")(images, PROMPTS)
    fi, _, _, _ = _reference_features(clip_dir, images, PROMPTS)
    sd = torch.load(head, weights_only=True)
    x = fi
    for idx in (0, 2, 4, 6, 7):  # the LAION MLP: linear layers only at inference
        x = x @ sd[f"layers.{idx}.weight"].T + sd[f"layers.{idx}.bias"]
    assert torch.allclose(got, x.squeeze(-1), atol=2e-3)
    bad = tmp_path / "bad.pth"
    torch.save({"layers.0.weight": torch.zeros(3, 3)}, bad)
    with pytest.raises(ConfigError, match="does not match the model"):
        get_scorer("aesthetic", path=clip_dir, head=str(bad), device="cpu")
    evil = tmp_path / "evil.pth"
    torch.save({"layers.0.weight": object()}, evil)  # a pickle with an arbitrary object: refused
    with pytest.raises(ConfigError, match="cannot be read as a checkpoint"):
        get_scorer("aesthetic", path=clip_dir, head=str(evil), device="cpu")


def test_options_are_checked_by_name_and_type(clip_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"has no option 'pth' \(did you mean 'path'\?\)"):
        get_scorer("pickscore", pth=clip_dir)
    with pytest.raises(ConfigError, match="needs option 'path'"):
        get_scorer("pickscore")
    with pytest.raises(ConfigError, match="scaling='x' is unknown"):
        get_scorer("pickscore", path=clip_dir, scaling="x")
    with pytest.raises(ConfigError, match="does not exist"):
        get_scorer("clipscore", path=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="is not a boolean"):
        get_scorer("pickscore", path=clip_dir, quantize="maybe")
    with pytest.raises(ConfigError, match="frames='last' is not allowed"):
        get_scorer("pickscore", path=clip_dir, frames="last")
    with pytest.raises(ConfigError, match="not in reward.names"):
        RewardSet(["digit_alignment"], [1.0], {"pickscore": {"path": clip_dir}})


def _install(tmp_path, monkeypatch, name, source):
    (tmp_path / f"{name}.py").write_text("import torch\n" + source)
    monkeypatch.syspath_prepend(str(tmp_path))


def test_wrapper_metadata_options_batches_and_videos(tmp_path, monkeypatch):
    _install(tmp_path, monkeypatch, "meta_scorers",
             "calls = []\n"
             "def tagged(images, prompts, metadata, bonus=0.0):\n"
             "    calls.append(images.shape[0])\n"
             "    return torch.tensor([float(m.get('tag') == 'count') + bonus for m in metadata])\n"
             "def two(images, prompts, scale=1.0):\n"
             "    return images.mean(dim=(1, 2, 3)) * scale\n")
    import meta_scorers

    rs = RewardSet(["meta_scorers:tagged", "meta_scorers:two"], [1.0, 1.0],
                   {"meta_scorers:tagged": {"bonus": "0.5", "batch_size": 2}, "meta_scorers:two": {"scale": 2}})
    x = torch.rand(5, 3, 8, 8)
    meta = [{"tag": "count"}, {}, {"tag": "color"}, {"tag": "count"}, {}]
    raw = rs.score(x, ["p"] * 5, meta)
    assert raw[:, 0].tolist() == [1.5, 0.5, 0.5, 1.5, 0.5]          # metadata reached it, bonus coerced to float
    assert meta_scorers.calls == [2, 2, 1]                          # batch_size=2
    assert torch.allclose(raw[:, 1], x.mean(dim=(1, 2, 3)) * 2)      # a two-argument scorer, with an option
    with pytest.raises(ConfigError, match="has no option 'bonus'"):
        get_scorer("meta_scorers:two", bonus=1)
    # videos [N, C, F, H, W]: the first frame, or the mean of the per-frame scores
    v = torch.rand(2, 3, 4, 8, 8)
    first = get_scorer("meta_scorers:two")(v, ["p"] * 2)
    mean = get_scorer("meta_scorers:two", frames="mean")(v, ["p"] * 2)
    assert torch.allclose(first, v[:, :, 0].mean(dim=(1, 2, 3)))
    assert torch.allclose(mean, torch.stack([v[:, :, f].mean(dim=(1, 2, 3)) for f in range(4)], 1).mean(1))


# ----------------------------------------------------------------------------- OCR
def _render(text: str, size=(256, 128)) -> torch.Tensor:
    img = Image.new("RGB", size, "white")
    if text:
        ImageDraw.Draw(img).text((12, 32), text, fill="black", font=ImageFont.load_default(size=44))
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255


def test_ocr_distance_and_target():
    from flowpo.rewards.ocr import levenshtein, ocr_reward, target_text

    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3 and levenshtein("abc", "abc") == 0
    assert target_text('a sign that says "Open Late" in neon', {}) == "Open Late"
    assert target_text("no quotes here", {}) is None
    assert target_text("no quotes", {"text": "given"}) == "given"
    assert ocr_reward("xx open late xx", "Open Late") == 1.0        # substring after removing spaces
    assert ocr_reward("opem late", "Open Late") == pytest.approx(1 - 1 / 8)
    assert ocr_reward("completely different words", "hi") == 0.0     # capped at the target's length


def test_ocr_reads_rendered_text_with_the_real_engine():
    pytest.importorskip("rapidocr")
    s = get_scorer("ocr", threads=1)
    images = torch.stack([_render("FLOWPO"), _render("ZEBRA"), _render("")])
    prompts = ['a poster with the word "flowpo"', 'a poster with the word "flowpo"', 'a sign saying "flowpo"']
    r = s(images, prompts)
    assert r[0] == 1.0                  # the rendered target
    assert r[1] < 0.5 and r[2] == 0.0   # wrong text; a blank image
    with pytest.raises(ConfigError, match=r"has no \(non-empty\) text in double quotes"):
        s(images[:1], ["no quotes"])
    with pytest.raises(ConfigError, match="non-empty"):
        s(images[:1], ['an empty target ""'])  # would otherwise score 1 for any image
    # min_confidence reaches the engine's own box filter: above every confidence, nothing is read
    assert get_scorer("ocr", min_confidence=1.01)(images[:1], prompts[:1]).tolist() == [0.0]
    assert get_scorer("ocr", missing="zero")(images[:1], ["no quotes"]).tolist() == [0.0]
    assert get_scorer("ocr")(images[:1], ["no quotes"], [{"text": "flowpo"}]).tolist() == [1.0]


def test_options_of_a_dotted_path_scorer_from_the_command_line():
    from flowpo import config

    cfg = config.load(None, None, ["reward.names=[my_pkg.my_mod:score]", "reward.weights=[1]",
                                   "reward.options.my_pkg.my_mod:score.threshold=0.5",
                                   "reward.options.my_pkg.my_mod:score.batch_size=4"])
    assert cfg.reward.options == {"my_pkg.my_mod:score": {"threshold": 0.5, "batch_size": 4}}
