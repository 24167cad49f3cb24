"""hpsv2: an open_clip-layout checkpoint converted onto transformers' CLIPModel.

A tiny random open_clip ViT CLIP state dict is built here and saved the way HPS_v2.1_compressed.pt
ships ({"state_dict": {"module." + key: tensor}}), then loaded through get_scorer exactly as a user
would. The scores are checked against an independent plain-torch forward of the SOURCE layout
(open_clip's math), the preprocessing against a PIL path, and the errors for one line each.
"""
from __future__ import annotations

import math
import string

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flowpo.rewards import get_scorer
from flowpo.rewards.hps import DROPPED_BUFFERS, openclip_to_hf
from flowpo.rewards.loading import RewardOptionError
from flowpo.rewards.preprocess import OPENAI_MEAN, OPENAI_STD, to_pixels
from tiny_pipelines import _CLIP_BOS, _CLIP_EOS, clip_tokenizer

V_WIDTH, V_LAYERS, PATCH, IMAGE = 32, 2, 8, 32
T_WIDTH, T_LAYERS, CTX, EMBED = 24, 2, 77, 16
HEADS = 2
PROMPTS = ["a red cat on a mat", "Two dogs, 3 birds!", "x" * 120]  # the last one is truncated to 77 tokens


def openclip_tokenizer():
    """The tiny character vocabulary of clip_tokenizer() laid out as the real CLIP/open_clip BPE is:
    sot and eot are the two LARGEST ids (49406, 49407 in the real vocab), so open_clip's
    `argmax(ids)` pooling finds the eot."""
    from transformers import CLIPTokenizer

    vocab = {}
    for ch in string.ascii_lowercase + string.digits + ",.!?'-":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    vocab[_CLIP_BOS] = len(vocab)
    vocab[_CLIP_EOS] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CTX)


def openclip_state(vocab: int, seed: int = 0) -> dict:
    """A random open_clip ViT CLIP state dict (the key names and shapes of open_clip's CLIP)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=None):
        return torch.randn(*shape, generator=g) * (shape[-1] ** -0.5 if s is None else s)

    sd = {}

    def block(prefix, w):
        sd[prefix + "ln_1.weight"], sd[prefix + "ln_1.bias"] = 1 + r(w, s=0.1), r(w, s=0.1)
        sd[prefix + "attn.in_proj_weight"], sd[prefix + "attn.in_proj_bias"] = r(3 * w, w), r(3 * w, s=0.1)
        sd[prefix + "attn.out_proj.weight"], sd[prefix + "attn.out_proj.bias"] = r(w, w), r(w, s=0.1)
        sd[prefix + "ln_2.weight"], sd[prefix + "ln_2.bias"] = 1 + r(w, s=0.1), r(w, s=0.1)
        sd[prefix + "mlp.c_fc.weight"], sd[prefix + "mlp.c_fc.bias"] = r(4 * w, w), r(4 * w, s=0.1)
        sd[prefix + "mlp.c_proj.weight"], sd[prefix + "mlp.c_proj.bias"] = r(w, 4 * w), r(w, s=0.1)

    grid = IMAGE // PATCH
    sd["visual.class_embedding"] = r(V_WIDTH, s=1.0)
    sd["visual.positional_embedding"] = r(1 + grid * grid, V_WIDTH, s=0.5)
    sd["visual.conv1.weight"] = r(V_WIDTH, 3, PATCH, PATCH, s=(3 * PATCH * PATCH) ** -0.5)
    sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"] = 1 + r(V_WIDTH, s=0.1), r(V_WIDTH, s=0.1)
    for i in range(V_LAYERS):
        block(f"visual.transformer.resblocks.{i}.", V_WIDTH)
    sd["visual.ln_post.weight"], sd["visual.ln_post.bias"] = 1 + r(V_WIDTH, s=0.1), r(V_WIDTH, s=0.1)
    sd["visual.proj"] = r(V_WIDTH, EMBED, s=V_WIDTH ** -0.5)
    sd["token_embedding.weight"] = r(vocab, T_WIDTH, s=1.0)
    sd["positional_embedding"] = r(CTX, T_WIDTH, s=0.5)
    for i in range(T_LAYERS):
        block(f"transformer.resblocks.{i}.", T_WIDTH)
    sd["ln_final.weight"], sd["ln_final.bias"] = 1 + r(T_WIDTH, s=0.1), r(T_WIDTH, s=0.1)
    sd["text_projection"] = r(T_WIDTH, EMBED, s=T_WIDTH ** -0.5)
    sd["logit_scale"] = torch.tensor(math.log(1 / 0.07))
    sd["attn_mask"] = torch.full((CTX, CTX), float("-inf")).triu(1)  # a buffer older open_clip versions save
    return sd


def save_checkpoint(sd: dict, path) -> str:
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 1}, str(path))
    return str(path)


# --- the independent reference: open_clip's forward on the source layout, in plain torch --------------------

def _resblock(x: torch.Tensor, sd: dict, prefix: str, heads: int, mask=None) -> torch.Tensor:
    """open_clip ResidualAttentionBlock: x += attn(ln_1(x)); x += c_proj(gelu(c_fc(ln_2(x)))).
    x: [L, N, w] (nn.MultiheadAttention's sequence-first layout)."""
    w = x.shape[-1]
    p = lambda k: sd[prefix + k]  # noqa: E731
    h = F.layer_norm(x, (w,), p("ln_1.weight"), p("ln_1.bias"), eps=1e-5)
    a, _ = F.multi_head_attention_forward(
        h, h, h, w, heads, p("attn.in_proj_weight"), p("attn.in_proj_bias"), None, None, False, 0.0,
        p("attn.out_proj.weight"), p("attn.out_proj.bias"), training=False, need_weights=False, attn_mask=mask)
    x = x + a
    h = F.layer_norm(x, (w,), p("ln_2.weight"), p("ln_2.bias"), eps=1e-5)
    return x + F.linear(F.gelu(F.linear(h, p("mlp.c_fc.weight"), p("mlp.c_fc.bias"))),
                        p("mlp.c_proj.weight"), p("mlp.c_proj.bias"))


def ref_image_features(sd: dict, pixels: torch.Tensor, heads: int = HEADS) -> torch.Tensor:
    """open_clip VisionTransformer: conv1 → [class] + patches → + pos → ln_pre → blocks → ln_post(token 0)
    @ proj."""
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=PATCH)          # [N, w, g, g]
    x = x.flatten(2).transpose(1, 2)                                       # [N, g², w]
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + sd["visual.positional_embedding"]
    x = F.layer_norm(x, (V_WIDTH,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"], eps=1e-5)
    x = x.transpose(0, 1)
    for i in range(V_LAYERS):
        x = _resblock(x, sd, f"visual.transformer.resblocks.{i}.", heads)
    x = x.transpose(0, 1)
    x = F.layer_norm(x[:, 0], (V_WIDTH,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"], eps=1e-5)
    return x @ sd["visual.proj"]


def openclip_tokenize(tok, prompts, ctx: int = CTX) -> torch.Tensor:
    """open_clip's framing: [sot] + bpe + [eot], cut to ctx with the last token forced to eot, zero padded."""
    sot, eot = tok.convert_tokens_to_ids(_CLIP_BOS), tok.convert_tokens_to_ids(_CLIP_EOS)
    out = torch.zeros(len(prompts), ctx, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids = [sot] + tok.encode(p, add_special_tokens=False) + [eot]
        if len(ids) > ctx:
            ids = ids[:ctx]
            ids[-1] = eot
        out[i, :len(ids)] = torch.tensor(ids)
    return out


def ref_text_features(sd: dict, ids: torch.Tensor, heads: int = HEADS, pool_at=None) -> torch.Tensor:
    """open_clip text tower: tok emb + pos → causal blocks → ln_final → x[argmax(ids)] @ text_projection."""
    x = F.embedding(ids, sd["token_embedding.weight"]) + sd["positional_embedding"]
    mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)
    x = x.transpose(0, 1)
    for i in range(T_LAYERS):
        x = _resblock(x, sd, f"transformer.resblocks.{i}.", heads, mask=mask)
    x = x.transpose(0, 1)
    x = F.layer_norm(x, (T_WIDTH,), sd["ln_final.weight"], sd["ln_final.bias"], eps=1e-5)
    at = ids.argmax(-1) if pool_at is None else pool_at
    return x[torch.arange(x.shape[0]), at] @ sd["text_projection"]


def ref_score(img_f: torch.Tensor, txt_f: torch.Tensor) -> torch.Tensor:
    return (F.normalize(img_f, dim=-1) * F.normalize(txt_f, dim=-1)).sum(-1)


# --- fixtures -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("hps")
    tok = openclip_tokenizer()
    tok.save_pretrained(d / "tokenizer")
    sd = openclip_state(len(tok))
    return {"sd": sd, "tok": tok, "ckpt": save_checkpoint(sd, d / "HPS_v2.1_compressed.pt"),
            "tok_dir": str(d / "tokenizer"), "dir": d}


@pytest.fixture(scope="module")
def scorer(files):
    """The tiny HPS loaded through get_scorer, as a user's config would (shared by the read-only tests)."""
    return _scorer(files)


def _scorer(files, **kw):
    opts = dict(path=files["ckpt"], processor_path=files["tok_dir"], vision_heads=HEADS, text_heads=HEADS,
                device="cpu")
    opts.update(kw)
    return get_scorer("hpsv2", **opts)


def _images(seed=0, shapes=((48, 40), (40, 64), (32, 32))):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(1, 3, h, w, generator=g) for h, w in shapes]


# --- 1/2: conversion is strict and equals the source layout's forward -----------------------------------------

def test_conversion_is_strict_and_reads_the_architecture_off_the_shapes(files):
    from transformers import CLIPModel

    sd = {"module." + k: v for k, v in files["sd"].items()}
    config, hf = openclip_to_hf(sd, vision_heads=HEADS, text_heads=HEADS, tokenizer=files["tok"])
    model = CLIPModel(config)
    res = model.load_state_dict(hf, strict=False)
    assert res.missing_keys == [] and res.unexpected_keys == []
    assert set(hf) == set(model.state_dict())  # every parameter set, nothing extra
    model.load_state_dict(hf, strict=True)
    v, t = config.vision_config, config.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.patch_size, v.image_size, v.intermediate_size) == \
        (V_WIDTH, V_LAYERS, PATCH, IMAGE, 4 * V_WIDTH)
    assert (t.hidden_size, t.num_hidden_layers, t.max_position_embeddings, t.vocab_size, t.intermediate_size) == \
        (T_WIDTH, T_LAYERS, CTX, len(files["tok"]), 4 * T_WIDTH)
    assert config.projection_dim == EMBED and v.hidden_act == "gelu" and t.hidden_act == "gelu"
    assert t.eos_token_id == files["tok"].convert_tokens_to_ids(_CLIP_EOS) == len(files["tok"]) - 1
    # the projections are transposed (open_clip multiplies x @ P), q/k/v are the thirds of in_proj
    assert torch.equal(hf["visual_projection.weight"], files["sd"]["visual.proj"].T)
    assert torch.equal(hf["text_projection.weight"], files["sd"]["text_projection"].T)
    w = files["sd"]["transformer.resblocks.1.attn.in_proj_weight"]
    assert torch.equal(hf["text_model.encoder.layers.1.self_attn.v_proj.weight"], w[2 * T_WIDTH:])
    assert "attn_mask" in DROPPED_BUFFERS and not any("attn_mask" in k for k in hf)


def test_scores_equal_an_independent_forward_of_the_open_clip_layout(files, scorer):
    sc = scorer
    hps, sd, tok = sc.fn, files["sd"], files["tok"]
    images = torch.cat([torch.nn.functional.interpolate(x, size=(40, 56)) for x in _images()])
    pixels = hps.pixels(images)
    assert pixels.shape == (3, 3, IMAGE, IMAGE)
    with torch.no_grad():
        hf_img = hps.model.get_image_features(pixel_values=pixels).pooler_output
        ids = hps.tokenize(PROMPTS)
        hf_txt = hps.model.get_text_features(input_ids=ids).pooler_output
        ref_img = ref_image_features(sd, pixels)
        oc_ids = openclip_tokenize(tok, PROMPTS)
        ref_txt = ref_text_features(sd, oc_ids)
        scores = sc(images, PROMPTS)
    # the HF tokenisation frames the prompt as open_clip does up to the eot (padding differs: eot vs 0,
    # which the causal text tower never sees from the eot position)
    eot = oc_ids.argmax(-1)
    assert torch.equal(eot, (ids == tok.eos_token_id).int().argmax(-1))
    assert int(eot[2]) == CTX - 1  # the long prompt was truncated with the eot kept
    for i in range(len(PROMPTS)):
        assert torch.equal(ids[i, :eot[i] + 1], oc_ids[i, :eot[i] + 1])
    torch.testing.assert_close(hf_img, ref_img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hf_txt, ref_txt, atol=1e-5, rtol=1e-5)
    ref = ref_score(ref_img, ref_txt)
    torch.testing.assert_close(scores, ref, atol=1e-5, rtol=0)
    assert scores.shape == (3,) and scores.abs().max() > 1e-2  # not a degenerate all-zero score
    assert float(ref.std()) > 1e-3
    # the comparison can tell a wrong head count apart (heads are not in the checkpoint's shapes)
    assert (ref_image_features(sd, pixels, heads=1) - ref_img).abs().max() > 1e-3
    assert (ref_text_features(sd, oc_ids, heads=1) - ref_txt).abs().max() > 1e-3


def test_text_pools_at_the_eot_even_when_it_is_not_the_largest_id(files, tmp_path):
    """clip_tokenizer() puts eot at id 1: the config's eos id, not argmax(ids), must choose the pool position."""
    tok = clip_tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    sd = openclip_state(len(tok), seed=1)
    sc = get_scorer("hpsv2", path=save_checkpoint(sd, tmp_path / "hps.pt"), processor_path=str(tmp_path / "tok"),
                    vision_heads=HEADS, text_heads=HEADS, device="cpu")
    ids = openclip_tokenize(tok, PROMPTS)
    eot_at = (ids == tok.eos_token_id).int().argmax(-1)
    with torch.no_grad():
        hf_txt = sc.fn.model.get_text_features(input_ids=sc.fn.tokenize(PROMPTS)).pooler_output
        ref_eot = ref_text_features(sd, ids, pool_at=eot_at)
        ref_argmax = ref_text_features(sd, ids)
    torch.testing.assert_close(hf_txt, ref_eot, atol=1e-5, rtol=1e-5)
    assert (hf_txt - ref_argmax).abs().max() > 1e-3


# --- 3: preprocessing against PIL -----------------------------------------------------------------------------

def pil_pixels(img_u8: np.ndarray, size: int) -> torch.Tensor:
    """The reference path: uint8 HWC → PIL → longest side to `size` (PIL bicubic) → pasted centred on black
    → /255 → (x − mean)/std. [1, 3, size, size]."""
    from PIL import Image

    h, w = img_u8.shape[:2]
    scale = size / max(h, w)
    nh, nw = round(h * scale), round(w * scale)
    im = Image.fromarray(img_u8).resize((nw, nh), Image.BICUBIC)
    canvas = Image.new("RGB", (size, size), (0, 0, 0))
    canvas.paste(im, ((size - nw) // 2, (size - nh) // 2))
    x = torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).float() / 255
    x = (x - torch.tensor(OPENAI_MEAN).view(3, 1, 1)) / torch.tensor(OPENAI_STD).view(3, 1, 1)
    return x.unsqueeze(0)


def _u8_images(seed: int, shapes=((48, 40), (40, 64))):
    """Per shape (H, W): natural-like content (a coarse random image, bilinearly enlarged: edges and
    gradients, values inside [0, 255] after any bicubic filter), a smooth gradient, and per-pixel noise."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for h, w in shapes:
        low = torch.rand(1, 3, h // 6, w // 6, generator=g)
        nat = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
        yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
        smooth = torch.stack([yy, xx, (yy + xx) / 2], -1)
        noise = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8)
        out.append({"natural": (nat * 255).round().to(torch.uint8), "smooth": (smooth * 255).round().to(torch.uint8),
                    "noise": noise})
    return out


def _as_batch(u8: torch.Tensor) -> torch.Tensor:
    return u8.permute(2, 0, 1)[None].float() / 255


# Measured (torch 2.13, Pillow 13, seeds 0-4, 48x40 and 40x64 → 32 and → 224), max |Δ| in normalised
# units (in brackets: in 1/255 steps of the [0, 1] image, i.e. × std × 255), with to_pixels resizing
# in PIL's two passes, each clipped and rounded to uint8 levels:
#   downsampling to 32: 0.015 (1.0/255) for natural-like, smooth and per-pixel-noise content;
#   upsampling to 224: 0.030 (2.0/255) — PIL's fixed-point filter weights round differently.
# (A one-pass float resize without the clipping was 11/255 and 47/255 off on the noise images.)
PIXEL_TOL = 0.0305                                 # ≤ 2/255 levels at std 0.2613
NOISE_TOL = {IMAGE: PIXEL_TOL, 224: PIXEL_TOL}     # the two-pass resize clips overshoot as PIL does
SCORE_TOL = 2e-3


@pytest.mark.parametrize("size", [IMAGE, 224])  # downsampling (the tiny model) and upsampling to ViT-H-14's 224
def test_pad_preprocessing_matches_pil(size):
    m, s = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    worst = {"natural": 0.0, "smooth": 0.0, "noise": 0.0}
    for per_shape in _u8_images(seed=3):
        for kind, u8 in per_shape.items():
            ref = pil_pixels(u8.numpy(), size)
            ours = to_pixels(_as_batch(u8), size, mode="pad")
            assert ours.shape == ref.shape == (1, 3, size, size)
            diff = (ours - ref).abs().max().item()
            worst[kind] = max(worst[kind], diff)
            tol = NOISE_TOL[size] if kind == "noise" else PIXEL_TOL
            assert diff < tol, f"{kind} {tuple(u8.shape[:2])} → {size}: max |Δ| {diff:.4f} ≥ {tol}"
            # both are black (zero before normalising) on the same centred pad band, and only there
            h, w = u8.shape[:2]
            nh, nw = round(h * size / max(h, w)), round(w * size / max(h, w))
            band = torch.ones(size, size, dtype=torch.bool)
            band[(size - nh) // 2:(size - nh) // 2 + nh, (size - nw) // 2:(size - nw) // 2 + nw] = False
            assert band.any()
            for px in (ref, ours):
                black = ((px * s + m).abs().amax(1) < 1e-6)[0]
                assert black[band].all() and (~black[~band]).float().mean() > 0.9
    assert worst["natural"] > 0 and worst["smooth"] > 0  # the two paths really are different implementations
    # a centre crop (CLIP's preprocessing) is far from it: the test tells the two apart
    u8 = _u8_images(seed=3)[0]["natural"]
    crop = to_pixels(_as_batch(u8), size, mode="crop")
    assert (crop - pil_pixels(u8.numpy(), size)).abs().max() > 10 * PIXEL_TOL


def test_pil_preprocessing_moves_the_score_by_little(scorer):
    sc = scorer
    hps = sc.fn
    imgs = [per_shape["natural"] for per_shape in _u8_images(seed=4)]
    ref_px = torch.cat([pil_pixels(u8.numpy(), hps.size) for u8 in imgs])
    ours_px = torch.cat([hps.pixels(_as_batch(u8)) for u8 in imgs])
    with torch.no_grad():
        txt = hps.text_features(PROMPTS[:2])
        s_ref = (hps.encode_pixels(ref_px) * txt).sum(-1)
        s_ours = (hps.encode_pixels(ours_px) * txt).sum(-1)
        direct = torch.cat([sc(_as_batch(u8), [p]) for u8, p in zip(imgs, PROMPTS)])
    assert (s_ref - s_ours).abs().max() < SCORE_TOL
    assert s_ref.abs().min() > 10 * SCORE_TOL  # the tolerance is small against the scores themselves
    torch.testing.assert_close(direct, s_ours, atol=1e-6, rtol=0)


# --- 4: one-line errors ---------------------------------------------------------------------------------------

RAN = []


def _record(tag):
    RAN.append(tag)
    return tag


class _Payload:
    """A pickle whose loading would call _record (what weights_only must refuse to do)."""

    def __reduce__(self):
        return (_record, ("code ran",))


def _one_line_error(files, match, **kw) -> str:
    with pytest.raises(RewardOptionError, match=match) as e:
        _scorer(files, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_options_and_files_are_one_line(files, tmp_path):
    _one_line_error(files, "needs option 'path'", path=None)
    _one_line_error(files, r"path='.*nope\.pt' does not exist", path=str(tmp_path / "nope.pt"))
    _one_line_error(files, "is a folder, not a file", path=str(tmp_path))
    _one_line_error(files, "needs option 'processor_path'", processor_path=None)
    _one_line_error(files, "does not exist", processor_path=str(tmp_path / "no_tok"))


def test_wrong_checkpoints_are_one_line_naming_the_file(files, scorer, tmp_path):
    bad = str(tmp_path / "random_keys.pt")
    torch.save({"state_dict": {"encoder.weight": torch.randn(4, 4), "head.bias": torch.randn(4)}}, bad)
    msg = _one_line_error(files, "is not an open_clip CLIP state dict", path=bad)
    assert "random_keys.pt" in msg

    extra = dict(files["sd"], **{"visual.head.weight": torch.randn(2, 2)})
    msg = _one_line_error(files, r"not open_clip ViT CLIP weights \(\['visual.head.weight'\]",
                          path=save_checkpoint(extra, tmp_path / "extra.pt"))
    assert "extra.pt" in msg

    short = {k: v for k, v in files["sd"].items() if k != "ln_final.bias"}
    msg = _one_line_error(files, r"missing \['text_model.final_layer_norm.bias'\]",
                          path=save_checkpoint(short, tmp_path / "short.pt"))
    assert "short.pt" in msg

    sd = openclip_state(len(files["tok"]) - 5)
    _one_line_error(files, "tokenizer has .* tokens but .* embeds", path=save_checkpoint(sd, tmp_path / "voc.pt"))
    _one_line_error(files, "vision_heads=5 does not divide the checkpoint.s width 32", vision_heads=5)
    _one_line_error(files, "text_heads=5 does not divide the checkpoint.s width 24", text_heads=5)

    from safetensors.torch import save_file

    st = tmp_path / "hps.safetensors"  # a .safetensors of the (unprefixed) state dict loads the same
    save_file({k: v.contiguous() for k, v in files["sd"].items()}, str(st))
    x = _images()[0]
    torch.testing.assert_close(_scorer(files, path=str(st))(x, PROMPTS[:1]), scorer(x, PROMPTS[:1]))


def test_pickle_with_code_is_refused_by_weights_only(files, tmp_path):
    evil = str(tmp_path / "evil.pt")
    torch.save({"state_dict": {"visual.conv1.weight": torch.zeros(1), "x": _Payload()}}, evil)
    RAN.clear()
    msg = _one_line_error(files, "cannot be read as a checkpoint", path=evil)
    assert "evil.pt" in msg and RAN == []
    assert torch.load(evil, weights_only=False)["state_dict"]["x"] == "code ran"  # it really was a payload
    RAN.clear()
    notensor = str(tmp_path / "strings.pt")
    torch.save({"state_dict": {"visual.conv1.weight": "not a tensor"}}, notensor)
    _one_line_error(files, "holds no state dict of tensors", path=notensor)


# --- 5: videos through the get_scorer wrapper -----------------------------------------------------------------

def test_video_first_and_mean_frames(files):
    g = torch.Generator().manual_seed(5)
    video = torch.rand(2, 3, 3, 40, 48, generator=g)  # [N, C, F, H, W]
    prompts = PROMPTS[:2]
    first, mean = _scorer(files, frames="first"), _scorer(files, frames="mean", batch_size=2)
    per_frame = torch.stack([first(video[:, :, f], prompts) for f in range(video.shape[2])], 1)  # [N, F]
    assert per_frame.std(1).min() > 1e-5  # frames really score differently
    got_first, got_mean = first(video, prompts), mean(video, prompts)
    assert got_first.shape == got_mean.shape == (2,)
    torch.testing.assert_close(got_first, per_frame[:, 0], atol=1e-6, rtol=0)
    torch.testing.assert_close(got_mean, per_frame.mean(1), atol=1e-6, rtol=0)
