"""ImageReward scorer: a tiny random checkpoint in ImageReward.pt's own layout, loaded the user's way
(get_scorer("imagereward", path=..., processor_path=...)), checked against an independent plain-torch
forward of that source layout (timm ViT + BLIP's med BERT + MLP head), against a PIL preprocessing
path, and for one-line errors. Offline, CPU, seconds."""
from __future__ import annotations

import math
import string

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flowpo.rewards import get_scorer
from flowpo.rewards.imagereward import MEAN, STD, TEXT_LENGTH, UNUSED_KEYS, blip_to_hf
from flowpo.rewards.loading import RewardOptionError
from flowpo.rewards.preprocess import OPENAI_MEAN, OPENAI_STD, center_crop, resize_shortest

# tiny sizes: ViT width 32, 2 blocks, patch 16, image 32 (2×2 patches + CLS = 5 tokens), 2 heads;
# BERT hidden 24, 2 layers, intermediate 48, 2 heads, 40 positions (≥ 35), cross-attention from width 32
V_WIDTH, V_BLOCKS, V_MLP, PATCH, IMAGE, V_HEADS = 32, 2, 64, 16, 32, 2
T_HIDDEN, T_LAYERS, T_INTER, T_POS, T_HEADS = 24, 2, 48, 40, 2
WORDS = ["the", "cat", "dog", "red", "blue", "photo", "of", "on", "painting", "ocean"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PROMPTS = ["a photo of a red cat", "the dog", "a blue painting of the ocean on a photo of a cat " * 4, "zq"]
# Measured gap to the PIL path (Pillow 13, test_preprocessing_matches_pil): ≤ 1 uint8 level for
# downsampling, ≤ 2 levels for upsampling (PIL's 22-bit fixed-point filter and round-half-up), i.e.
# ≤ 2/255/min(std) = 0.0300 in normalised units; the tolerance is those 2 levels. The scores of the
# tiny random model then move by ≤ 1.8e-3 (measured over 8 seeds × 9 shapes); SCORE_TOL leaves room.
LEVEL = 1 / 255 / min(OPENAI_STD)
PIXEL_TOL = 2 * LEVEL + 1e-4
SCORE_TOL = 5e-3


def vocab_tokens(extra: tuple[str, ...] = ()) -> list[str]:
    letters = list(string.ascii_lowercase)
    return SPECIAL + letters + ["##" + c for c in letters] + WORDS + list(extra)


def write_tokenizer(folder, extra: tuple[str, ...] = ()) -> str:
    """A bert-base-uncased-like tokenizer folder: just a vocab.txt (BertTokenizer lowercases by default)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab_tokens(extra)) + "\n")
    return str(folder)


VOCAB = len(vocab_tokens()) + 2  # + BLIP's [DEC], [ENC]


def source_state_dict(seed: int = 0, vocab: int = VOCAB, unused: bool = True) -> dict[str, torch.Tensor]:
    """Random weights with ImageReward.pt's key names and shapes (tiny widths)."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape, scale=None):
        fan_in = shape[-1] if len(shape) > 1 else 1
        return torch.randn(*shape, generator=g) * (scale if scale is not None else 1 / math.sqrt(fan_in))

    def ln(prefix, n):
        return {prefix + ".weight": 1 + 0.1 * torch.randn(n, generator=g),
                prefix + ".bias": 0.1 * torch.randn(n, generator=g)}

    def lin(prefix, out, inp):
        return {prefix + ".weight": w(out, inp), prefix + ".bias": 0.1 * torch.randn(out, generator=g)}

    sd: dict[str, torch.Tensor] = {}
    v = "blip.visual_encoder."
    n_tok = (IMAGE // PATCH) ** 2 + 1
    sd[v + "cls_token"] = w(1, 1, V_WIDTH, scale=0.5)
    sd[v + "pos_embed"] = w(1, n_tok, V_WIDTH, scale=0.5)
    sd[v + "patch_embed.proj.weight"] = w(V_WIDTH, 3, PATCH, PATCH, scale=1 / math.sqrt(3 * PATCH * PATCH))
    sd[v + "patch_embed.proj.bias"] = 0.1 * torch.randn(V_WIDTH, generator=g)
    for i in range(V_BLOCKS):
        b = f"{v}blocks.{i}."
        sd.update(ln(b + "norm1", V_WIDTH))
        sd.update(lin(b + "attn.qkv", 3 * V_WIDTH, V_WIDTH))
        sd.update(lin(b + "attn.proj", V_WIDTH, V_WIDTH))
        sd.update(ln(b + "norm2", V_WIDTH))
        sd.update(lin(b + "mlp.fc1", V_MLP, V_WIDTH))
        sd.update(lin(b + "mlp.fc2", V_WIDTH, V_MLP))
    sd.update(ln(v + "norm", V_WIDTH))
    t = "blip.text_encoder."
    sd[t + "embeddings.word_embeddings.weight"] = w(vocab, T_HIDDEN, scale=1.0)
    sd[t + "embeddings.position_embeddings.weight"] = w(T_POS, T_HIDDEN, scale=1.0)
    sd.update(ln(t + "embeddings.LayerNorm", T_HIDDEN))
    for i in range(T_LAYERS):
        b = f"{t}encoder.layer.{i}."
        for part, kv_in in (("attention", T_HIDDEN), ("crossattention", V_WIDTH)):
            sd.update(lin(b + part + ".self.query", T_HIDDEN, T_HIDDEN))
            sd.update(lin(b + part + ".self.key", T_HIDDEN, kv_in))
            sd.update(lin(b + part + ".self.value", T_HIDDEN, kv_in))
            sd.update(lin(b + part + ".output.dense", T_HIDDEN, T_HIDDEN))
            sd.update(ln(b + part + ".output.LayerNorm", T_HIDDEN))
        sd.update(lin(b + "intermediate.dense", T_INTER, T_HIDDEN))
        sd.update(lin(b + "output.dense", T_HIDDEN, T_INTER))
        sd.update(ln(b + "output.LayerNorm", T_HIDDEN))
    for idx, (a, o) in zip((0, 2, 4, 6, 7), ((T_HIDDEN, 1024), (1024, 128), (128, 64), (64, 16), (16, 1))):
        sd.update(lin(f"mlp.layers.{idx}", o, a))
    if unused:  # what BLIP_Pretrain also saves
        sd[t + "embeddings.position_ids"] = torch.arange(T_POS).expand(1, -1).clone()
        sd.update(lin("blip.vision_proj", 16, V_WIDTH))
        sd.update(lin("blip.text_proj", 16, T_HIDDEN))
    return sd


# ---- an independent forward of the source layout, plain torch ----

def _ln(x, sd, p, eps):
    return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps)


def _lin(x, sd, p):
    return x @ sd[p + ".weight"].T + sd[p + ".bias"]


def ref_vit(sd, pixels, heads=V_HEADS):
    v = "blip.visual_encoder."
    x = F.conv2d(pixels, sd[v + "patch_embed.proj.weight"], sd[v + "patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd[v + "cls_token"].expand(x.shape[0], -1, -1), x], 1) + sd[v + "pos_embed"]
    b, n, c = x.shape
    for i in range(V_BLOCKS):
        p = f"{v}blocks.{i}."
        qkv = _lin(_ln(x, sd, p + "norm1", 1e-6), sd, p + "attn.qkv").reshape(b, n, 3, heads, c // heads)
        q, k, val = qkv.permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) * (c // heads) ** -0.5, -1)
        x = x + _lin((a @ val).transpose(1, 2).reshape(b, n, c), sd, p + "attn.proj")
        x = x + _lin(F.gelu(_lin(_ln(x, sd, p + "norm2", 1e-6), sd, p + "mlp.fc1")), sd, p + "mlp.fc2")
    return _ln(x, sd, v + "norm", 1e-6)


def _attend(sd, p, h, kv, bias, heads):
    b, t, d = h.shape
    hd = d // heads

    def split(z):
        return z.reshape(b, z.shape[1], heads, hd).transpose(1, 2)

    q = split(_lin(h, sd, p + ".self.query"))
    k, v = split(_lin(kv, sd, p + ".self.key")), split(_lin(kv, sd, p + ".self.value"))
    s = q @ k.transpose(-1, -2) / math.sqrt(hd)
    if bias is not None:
        s = s + bias
    ctx = (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(b, t, d)
    return _ln(_lin(ctx, sd, p + ".output.dense") + h, sd, p + ".output.LayerNorm", 1e-12)


def ref_text(sd, ids, mask, image_embeds, heads=T_HEADS, causal=False, use_mask=True):
    t = "blip.text_encoder."
    words, positions = sd[t + "embeddings.word_embeddings.weight"], sd[t + "embeddings.position_embeddings.weight"]
    h = words[ids] + positions[: ids.shape[1]]
    h = _ln(h, sd, t + "embeddings.LayerNorm", 1e-12)
    m = mask[:, None, None, :].float() if use_mask else torch.ones_like(mask[:, None, None, :]).float()
    if causal:
        m = m * torch.tril(torch.ones(ids.shape[1], ids.shape[1]))[None, None]
    bias = (1.0 - m) * -10000.0  # BLIP med.py's extended mask
    for i in range(T_LAYERS):
        p = f"{t}encoder.layer.{i}."
        h = _attend(sd, p + "attention", h, h, bias, heads)
        h = _attend(sd, p + "crossattention", h, image_embeds, None, heads)  # image mask all ones
        h = _ln(_lin(F.gelu(_lin(h, sd, p + "intermediate.dense")), sd, p + "output.dense") + h, sd,
                p + "output.LayerNorm", 1e-12)
    return h


def ref_head(sd, feat):
    for idx in (0, 2, 4, 6, 7):
        feat = _lin(feat, sd, f"mlp.layers.{idx}")
    return ((feat - MEAN) / STD).squeeze(-1)


def ref_tokens(tok_dir, prompts):  # noqa: ARG001 - tok_dir kept for symmetry
    from transformers import BertTokenizer

    tok = BertTokenizer(vocab={t: i for i, t in enumerate(vocab_tokens())})  # built here, not read from tok_dir
    out = tok(prompts, padding="max_length", truncation=True, max_length=TEXT_LENGTH, return_tensors="pt")
    return out["input_ids"], out["attention_mask"]


def ref_score(sd, tok_dir, pixels, prompts, **kw):
    ids, mask = ref_tokens(tok_dir, prompts)
    return ref_head(sd, ref_text(sd, ids, mask, ref_vit(sd, pixels), **kw)[:, 0])


# ---- fixtures ----

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagereward")
    sd = source_state_dict()
    torch.save(sd, root / "ImageReward.pt")
    return {"root": root, "sd": sd, "ckpt": str(root / "ImageReward.pt"), "tok": write_tokenizer(root / "bert")}


@pytest.fixture(scope="module")
def scorer(files):
    fn = get_scorer("imagereward", path=files["ckpt"], processor_path=files["tok"], vision_heads=V_HEADS,
                    text_heads=T_HEADS, device="cpu")
    return fn.fn  # the ImageReward instance behind the registry's wrapper


def random_pixels(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, IMAGE, IMAGE, generator=g)


# ---- mapping ----

def test_mapping_is_strict_and_shapes_inferred(files):
    from transformers import BlipTextModel, BlipVisionModel

    sd = files["sd"]
    vc, tc, vsd, tsd, hsd = blip_to_hf(sd, vision_heads=V_HEADS, text_heads=T_HEADS)
    assert (vc.hidden_size, vc.num_hidden_layers, vc.intermediate_size, vc.patch_size, vc.image_size) == \
        (V_WIDTH, V_BLOCKS, V_MLP, PATCH, IMAGE)
    assert vc.layer_norm_eps == 1e-6 and vc.num_attention_heads == V_HEADS
    assert (tc.hidden_size, tc.num_hidden_layers, tc.intermediate_size, tc.encoder_hidden_size, tc.vocab_size,
            tc.max_position_embeddings) == (T_HIDDEN, T_LAYERS, T_INTER, V_WIDTH, VOCAB, T_POS)
    assert tc.layer_norm_eps == 1e-12 and tc.is_decoder and tc.num_attention_heads == T_HEADS
    # every source key is used once or is in the explicit unused list
    assert len(vsd) + len(tsd) + len(hsd) + len(UNUSED_KEYS & set(sd)) == len(sd)
    assert UNUSED_KEYS <= set(sd)
    BlipVisionModel(vc).load_state_dict(vsd, strict=True)
    BlipTextModel(tc, add_pooling_layer=False).load_state_dict(tsd, strict=True)
    assert torch.equal(vsd["encoder.layers.1.self_attn.qkv.weight"], sd["blip.visual_encoder.blocks.1.attn.qkv.weight"])
    assert torch.equal(vsd["post_layernorm.bias"], sd["blip.visual_encoder.norm.bias"])
    # the unused keys are optional: a checkpoint without them maps the same
    assert len(blip_to_hf(source_state_dict(unused=False), vision_heads=V_HEADS, text_heads=T_HEADS)[3]) == len(tsd)


def test_mapping_of_real_imagereward_shapes():
    """ImageReward v1.0's shapes (meta tensors, no memory): ViT-L/16 at 224, BERT-base with 30524 words."""
    def m(*shape):
        return torch.empty(*shape, device="meta")

    sd = {"blip.visual_encoder.cls_token": m(1, 1, 1024), "blip.visual_encoder.pos_embed": m(1, 197, 1024),
          "blip.visual_encoder.patch_embed.proj.weight": m(1024, 3, 16, 16),
          "blip.visual_encoder.patch_embed.proj.bias": m(1024),
          "blip.visual_encoder.norm.weight": m(1024), "blip.visual_encoder.norm.bias": m(1024),
          "blip.text_encoder.embeddings.word_embeddings.weight": m(30524, 768),
          "blip.text_encoder.embeddings.position_embeddings.weight": m(512, 768),
          "blip.text_encoder.embeddings.position_ids": m(1, 512),
          "blip.vision_proj.weight": m(256, 1024), "blip.text_proj.weight": m(256, 768)}
    for i in range(24):
        b = f"blip.visual_encoder.blocks.{i}."
        sd.update({b + "attn.qkv.weight": m(3072, 1024), b + "mlp.fc1.weight": m(4096, 1024),
                   b + "mlp.fc2.weight": m(1024, 4096)})
    for i in range(12):
        b = f"blip.text_encoder.encoder.layer.{i}."
        sd.update({b + "crossattention.self.key.weight": m(768, 1024), b + "intermediate.dense.weight": m(3072, 768)})
    for idx, (a, o) in zip((0, 2, 4, 6, 7), ((768, 1024), (1024, 128), (128, 64), (64, 16), (16, 1))):
        sd[f"mlp.layers.{idx}.weight"] = m(o, a)
    vc, tc, *_ = blip_to_hf(sd)
    assert (vc.image_size, vc.patch_size, vc.hidden_size, vc.num_hidden_layers, vc.num_attention_heads,
            vc.intermediate_size) == (224, 16, 1024, 24, 16, 4096)
    assert (tc.vocab_size, tc.hidden_size, tc.num_hidden_layers, tc.num_attention_heads, tc.encoder_hidden_size,
            tc.intermediate_size, tc.max_position_embeddings) == (30524, 768, 12, 12, 1024, 3072, 512)


def test_forward_matches_source_layout(files, scorer):
    sd, tok_dir = files["sd"], files["tok"]
    pixels = random_pixels(len(PROMPTS))
    ids, mask = ref_tokens(tok_dir, PROMPTS)
    assert ids.shape == (len(PROMPTS), TEXT_LENGTH) and bool((ids[:, 0] == vocab_tokens().index("[CLS]")).all())
    assert 0 < int(mask[1].sum()) < TEXT_LENGTH and int(mask[2].sum()) == TEXT_LENGTH  # padded and truncated
    # the scorer's tokenizer gives the same ids (BLIP's added tokens do not change ordinary text)
    tok = scorer.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=TEXT_LENGTH, return_tensors="pt")
    assert torch.equal(tok["input_ids"], ids) and len(scorer.tokenizer) == VOCAB
    assert scorer.tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [VOCAB - 2, VOCAB - 1]

    with torch.no_grad():
        img_ref = ref_vit(sd, pixels)
        img = scorer.vision(pixel_values=pixels).last_hidden_state
        assert img.shape == (len(PROMPTS), 5, V_WIDTH)
        assert (img - img_ref).abs().max().item() < 1e-5
        got = scorer.score_pixels(pixels, PROMPTS)
        want = ref_score(sd, tok_dir, pixels, PROMPTS)
        assert got.shape == (len(PROMPTS),)
        assert (got - want).abs().max().item() < 1e-5, (got, want)
        # the check can tell: the padding mask and bidirectional attention both move the scores
        assert (ref_score(sd, tok_dir, pixels, PROMPTS, use_mask=False) - want).abs().max().item() > 1e-3
        assert (ref_score(sd, tok_dir, pixels, PROMPTS, causal=True) - want).abs().max().item() > 1e-3
        assert want.std().item() > 1e-3  # images/prompts give different rewards


def test_call_on_images_is_preprocess_then_score(scorer):
    g = torch.Generator().manual_seed(3)
    images = torch.rand(2, 3, 40, 56, generator=g)
    r = scorer(images, PROMPTS[:2])
    assert r.shape == (2,) and torch.isfinite(r).all()
    assert torch.allclose(r, scorer.score_pixels(scorer.pixels(images), PROMPTS[:2]), atol=1e-6)
    assert scorer.pixels(images).shape == (2, 3, IMAGE, IMAGE)


# ---- preprocessing vs PIL ----

def pil_pixels(arr: np.ndarray, size: int) -> torch.Tensor:
    """uint8 HWC → PIL resize of the shortest side (bicubic) → torchvision-style centre crop (offset
    round((H − size)/2)) → /255 → OpenAI mean/std → [3, size, size]."""
    from PIL import Image

    img = Image.fromarray(arr)
    w, h = img.size
    nw, nh = (int(size * w / h), size) if h <= w else (size, int(size * h / w))  # torchvision Resize(int)
    img = img.resize((nw, nh), Image.BICUBIC)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    img = img.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(img).astype(np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(OPENAI_MEAN).view(3, 1, 1)) / torch.tensor(OPENAI_STD).view(3, 1, 1)


def smooth_image(h, w, seed):
    """A natural-ish uint8 image: a bicubic-upsampled coarse pattern plus mild noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, max(2, h // 6), max(2, w // 6), generator=g)
    x = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[0]
    x = (x + 0.03 * torch.randn(3, h, w, generator=g)).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def noise_image(h, w, seed):
    """Uniform uint8 noise: the worst case for bicubic overshoot (clipped by PIL between its passes)."""
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def as_batch(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255


# (H, W) → shortest side 32: downsampling landscape (crop offset 11/2 → round 6 ≠ floor 5), upsampling
# portrait (the same odd offset, vertical), downsampling with an even offset, 2× upsampling, and a
# portrait reduction. Pillow 13 runs the vertical pass first for some tall reductions (seen for H ≥ 100,
# e.g. 100×37); the scorer follows Pillow's horizontal-first pass order, so those are not used here.
SHAPES = [(40, 54), (27, 20), (45, 70), (16, 24), (64, 40)]


@pytest.mark.parametrize("kind", ["smooth", "noise"])
@pytest.mark.parametrize("shape", SHAPES)
def test_preprocessing_matches_pil(scorer, shape, kind):
    arr = (smooth_image if kind == "smooth" else noise_image)(*shape, seed=sum(shape))
    images = as_batch(arr)
    got = scorer.pixels(images)[0]
    want = pil_pixels(arr, IMAGE)
    gap = (got - want).abs()
    assert gap.max().item() < PIXEL_TOL, gap.max().item() / LEVEL
    assert gap.mean().item() < 0.25 * LEVEL
    r_got = scorer(images, PROMPTS[:1])
    r_want = scorer.score_pixels(want[None], PROMPTS[:1])
    assert (r_got - r_want).abs().max().item() < SCORE_TOL, (r_got, r_want)


def test_one_float_pass_would_miss_pil(scorer):
    """A single float bicubic pass (no uint8 storage between PIL's passes) is many levels off on noise:
    the preprocessing test above can tell the two apart."""
    arr = noise_image(27, 20, seed=7)
    images = as_batch(arr)
    want = pil_pixels(arr, IMAGE)
    one_pass = center_crop(resize_shortest(images, IMAGE, quantize=False), IMAGE, "round")[0]
    one_pass = (one_pass - torch.tensor(OPENAI_MEAN).view(3, 1, 1)) / torch.tensor(OPENAI_STD).view(3, 1, 1)
    assert (one_pass - want).abs().max().item() > 3 * PIXEL_TOL
    assert (scorer.pixels(images)[0] - want).abs().max().item() < PIXEL_TOL


def test_crop_offset_rounds_as_torchvision(scorer):
    """(40, 54) resizes to 32×43: torchvision's left offset is round(11/2) = 6, a floor crop (the HF
    processors', flowpo.rewards.preprocess.center_crop) takes 5; that one-column shift is far outside
    the tolerance, so the preprocessing test above would catch it."""
    arr = smooth_image(40, 54, seed=94)
    images = as_batch(arr)
    want = pil_pixels(arr, IMAGE)
    resized = resize_shortest(images, IMAGE)
    assert resized.shape[-2:] == (32, 43)
    norm = (torch.tensor(OPENAI_MEAN).view(3, 1, 1), torch.tensor(OPENAI_STD).view(3, 1, 1))
    floor = (center_crop(resized, IMAGE)[0] - norm[0]) / norm[1]
    rounded = (center_crop(resized, IMAGE, "round")[0] - norm[0]) / norm[1]
    assert (floor - want).abs().max().item() > 5 * PIXEL_TOL
    assert (rounded - want).abs().max().item() < PIXEL_TOL
    assert torch.equal(scorer.pixels(images)[0], rounded)


# ---- one-line errors ----

def _one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_missing_path_and_tokenizer(files, tmp_path):
    with pytest.raises(RewardOptionError) as e:
        get_scorer("imagereward", processor_path=files["tok"], device="cpu")
    assert "needs option 'path'" in _one_line(e)
    with pytest.raises(RewardOptionError) as e:
        get_scorer("imagereward", path=str(tmp_path / "nope.pt"), processor_path=files["tok"], device="cpu")
    assert "does not exist" in _one_line(e)
    with pytest.raises(RewardOptionError) as e:
        get_scorer("imagereward", path=files["ckpt"], device="cpu")
    assert "needs option 'processor_path'" in _one_line(e)
    with pytest.raises(RewardOptionError) as e:
        get_scorer("imagereward", path=files["ckpt"], processor_path=str(tmp_path), device="cpu")
    assert "holds no vocab.txt" in _one_line(e)


def test_other_layouts_are_refused(files, tmp_path):
    sd = files["sd"]
    cases = {
        # BLIP's own checkpoint layout (no "blip." prefix, no ImageReward head)
        "blip": {k[len("blip."):]: v for k, v in sd.items() if k.startswith("blip.")},
        # a key the mapping does not know
        "extra": {**sd, "blip.itm_head.weight": torch.zeros(2, T_HIDDEN)},
        # a text encoder without cross-attention (BLIP's text-only encoder)
        "nocross": {k: v for k, v in sd.items() if "crossattention" not in k},
    }
    expect = {"blip": "no key 'blip.visual_encoder.pos_embed'", "extra": "unexpected keys ['blip.itm_head.weight']",
              "nocross": "crossattention"}
    for name, bad in cases.items():
        p = tmp_path / f"{name}.pt"
        torch.save(bad, p)
        with pytest.raises(RewardOptionError) as e:
            get_scorer("imagereward", path=str(p), processor_path=files["tok"], vision_heads=V_HEADS,
                       text_heads=T_HEADS, device="cpu")
        msg = _one_line(e)
        assert "is not an ImageReward checkpoint" in msg and expect[name] in msg, msg
    # a second crossattention layer missing: caught by the strict load
    partial = {k: v for k, v in sd.items() if "layer.1.crossattention" not in k}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(RewardOptionError) as e:
        get_scorer("imagereward", path=str(tmp_path / "partial.pt"), processor_path=files["tok"],
                   vision_heads=V_HEADS, text_heads=T_HEADS, device="cpu")
    assert "missing" in _one_line(e) and "layer.1.crossattention" in str(e.value)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RewardOptionError) as e:
        get_scorer("imagereward", path=str(tmp_path / "junk.pt"), processor_path=files["tok"], device="cpu")
    assert "cannot be read as a checkpoint" in _one_line(e)


def test_heads_must_divide(files):
    with pytest.raises(RewardOptionError) as e:
        get_scorer("imagereward", path=files["ckpt"], processor_path=files["tok"], vision_heads=3, device="cpu")
    assert "vision_heads=3" in _one_line(e)
    with pytest.raises(RewardOptionError) as e:
        get_scorer("imagereward", path=files["ckpt"], processor_path=files["tok"], vision_heads=V_HEADS,
                   text_heads=5, device="cpu")
    assert "text_heads=5" in _one_line(e)


def test_tokenizer_vocab_must_match_checkpoint(files, tmp_path):
    tok = write_tokenizer(tmp_path / "bigger", extra=("zebra",))
    with pytest.raises(RewardOptionError) as e:
        get_scorer("imagereward", path=files["ckpt"], processor_path=tok, vision_heads=V_HEADS,
                   text_heads=T_HEADS, device="cpu")
    msg = _one_line(e)
    assert f"has {VOCAB + 1} tokens" in msg and f"{VOCAB} rows" in msg, msg


def test_safetensors_checkpoint_loads_the_same(files, scorer, tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "ImageReward.safetensors"
    save_file({k: v.contiguous() for k, v in files["sd"].items()}, str(p))
    other = get_scorer("imagereward", path=str(p), processor_path=files["tok"], vision_heads=V_HEADS,
                       text_heads=T_HEADS, device="cpu").fn
    pixels = random_pixels(2, seed=5)
    assert torch.equal(other.score_pixels(pixels, PROMPTS[:2]), scorer.score_pixels(pixels, PROMPTS[:2]))
