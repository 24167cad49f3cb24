"""ImageReward v1.0 (Xu et al., arXiv 2304.05977) on transformers' BLIP modules, from local files only.

Model (BLIP ViT-L/16 + BLIP's "med" BERT-base with cross-attention, then an MLP head):

    v = ViT(pixels)                      timm-style pre-norm blocks, fused qkv, LayerNorm eps 1e-6,
                                         final norm: v = norm(x_L) ∈ R^{N×(1+P)×1024} (P = (224/16)²)
    h = BERT(ids, mask; v)               embeddings: LN(word[ids] + pos[0..T-1]) (no token types);
                                         per layer (post-norm, LN eps 1e-12):
                                           h ← LN(h + Wo·SelfAttn(h; padding mask))   (bidirectional)
                                           h ← LN(h + Wo·CrossAttn(h, v))             (image mask all ones)
                                           h ← LN(h + W2·GELU(W1·h))
    r = MLP(h[:, 0])                     768→1024→128→64→16→1, linear (dropouts between, no activations)
    reward = (r − 0.16717362830052426) / 1.0333394966054072

Text: bert-base-uncased plus BLIP's added tokens (`[DEC]` as bos, `[ENC]` as an additional special
token: vocab 30524), `padding="max_length"`, truncation, max_length 35. The first token stays `[CLS]`:
ImageReward's `score`/`inference_rank` pass the tokenizer's ids unchanged to `blip.text_encoder`
(mode "multimodal", is_decoder False); BLIP's ITM head is what swaps in `[ENC]`, and ImageReward does
not do that. The reward reads the text encoder's output at position 0.

Images (ImageReward: torchvision Resize(224, bicubic) + CenterCrop(224) on a PIL image, ToTensor,
Normalize), batched on tensors:

    quantise  x ← round(255·x)/255                  (option `quantize`)
    resize    shortest side → 224 as PIL does it: bicubic a = −0.5, antialiased, a horizontal pass
              then a vertical pass, each rounded and clipped to uint8 (PIL's intermediate image is
              uint8; quantize=False: one float pass instead)
    crop      224 × 224 at torchvision's offsets round((H − 224)/2), round((W − 224)/2) (half to even)
    normalise OpenAI CLIP mean/std

The image size is read from the checkpoint (pos_embed rows − 1 = (size/patch)²). Measured gap to the
PIL path (tests/test_reward_imagereward.py): ≤ 1 uint8 level when downsampling, ≤ 2 when upsampling
(PIL's fixed-point filter), i.e. ≤ 2/255/0.2613 ≈ 0.030 in normalised units. The pass order is that
of Pillow's Resample.c (horizontal first); the Pillow 13.0 build here runs the vertical pass first for
some tall reductions (e.g. 100×37 → 86×32), where noisy images then differ by up to ~15 levels.

Checkpoint `ImageReward.pt` (a torch state dict; or the same keys in a .safetensors) → modules:

    blip.visual_encoder.cls_token              → vision embeddings.class_embedding
    blip.visual_encoder.pos_embed              → vision embeddings.position_embedding
    blip.visual_encoder.patch_embed.proj.*     → vision embeddings.patch_embedding.*
    blip.visual_encoder.blocks.{i}.norm1/2.*   → vision encoder.layers.{i}.layer_norm1/2.*
    blip.visual_encoder.blocks.{i}.attn.qkv.*  → vision encoder.layers.{i}.self_attn.qkv.*
    blip.visual_encoder.blocks.{i}.attn.proj.* → vision encoder.layers.{i}.self_attn.projection.*
    blip.visual_encoder.blocks.{i}.mlp.fc1/2.* → vision encoder.layers.{i}.mlp.fc1/2.*
    blip.visual_encoder.norm.*                 → vision post_layernorm.*
    blip.text_encoder.<rest>                   → BlipTextModel <rest> (same names: embeddings.*,
                                                 encoder.layer.{i}.attention/crossattention/...)
    mlp.layers.{0,2,4,6,7}.*                   → head layers.{0,2,4,6,7}.*

BlipVisionModel's last_hidden_state is post-layernormed like BLIP's `norm(x)`; BlipTextModel is built
with is_decoder=True (so every layer has its cross-attention) and run with is_decoder=False
(bidirectional self-attention, as BLIP's encoder). Keys of BLIP that the score does not use are
dropped by the explicit list `UNUSED_KEYS` (BLIP_Pretrain's ITC projections vision_proj/text_proj and
med.py's persistent position_ids buffer; ImageReward itself loads with strict=False, so they are
optional here); any other key, or a missing one, is one RewardOptionError line.
"""
from __future__ import annotations

import math

import torch

from flowpo.rewards.loading import check_heads, device_of, dtype_of, from_pretrained, load_strict, need_path, \
    read_state_dict, RewardOptionError

HEADS_HINT = "the ImageReward v1.0 values are vision_heads=16, text_heads=12"
from flowpo.rewards.preprocess import OPENAI_MEAN, OPENAI_STD, to_pixels

REWARD = "imagereward"
MEAN, STD = 0.16717362830052426, 1.0333394966054072  # ImageReward's reward normalisation
TEXT_LENGTH = 35  # ImageReward's tokenizer max_length
DEC_TOKEN, ENC_TOKEN = "[DEC]", "[ENC]"  # BLIP's added tokens (ids 30522, 30523 in bert-base-uncased)
VISION_PREFIX, TEXT_PREFIX, HEAD_PREFIX = "blip.visual_encoder.", "blip.text_encoder.", "mlp."
# In ImageReward.pt but not on the score path: BLIP's image-text contrastive projections (BLIP_Pretrain's
# vision_proj / text_proj) and BERT's position_ids buffer (persistent in BLIP's med.py, a non-persistent
# buffer in transformers, so not a state-dict key there).
UNUSED_KEYS = frozenset({
    "blip.vision_proj.weight", "blip.vision_proj.bias",
    "blip.text_proj.weight", "blip.text_proj.bias",
    "blip.text_encoder.embeddings.position_ids",
})
_VISION_BLOCK = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
                 "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_VISION_TOP = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
               "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
               "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
               "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}
_REQUIRED = (VISION_PREFIX + "pos_embed", VISION_PREFIX + "patch_embed.proj.weight",
             TEXT_PREFIX + "embeddings.word_embeddings.weight", TEXT_PREFIX + "embeddings.position_embeddings.weight",
             HEAD_PREFIX + "layers.0.weight")


def _layout_error(source: str, what: str) -> RewardOptionError:
    return RewardOptionError(f"reward {REWARD!r}: {source} is not an ImageReward checkpoint ({what}); point "
                             f"reward.options.{REWARD}.path at ImageReward.pt (THUDM/ImageReward)")


def _vision_key(rest: str) -> str | None:
    if rest in _VISION_TOP:
        return _VISION_TOP[rest]
    parts = rest.split(".")
    if len(parts) >= 4 and parts[0] == "blocks" and parts[1].isdigit():
        inner, leaf = ".".join(parts[2:-1]), parts[-1]
        if inner in _VISION_BLOCK and leaf in ("weight", "bias"):
            return f"encoder.layers.{parts[1]}.{_VISION_BLOCK[inner]}.{leaf}"
    return None


def blip_to_hf(state_dict: dict, *, vision_heads: int = 16, text_heads: int = 12, source: str = "the checkpoint"):
    """ImageReward's state dict → (BlipVisionConfig, BlipTextConfig, vision state dict, text state
    dict, head state dict), the configs inferred from the tensor shapes (the head counts given)."""
    from transformers import BlipTextConfig, BlipVisionConfig

    missing = [k for k in _REQUIRED if k not in state_dict]
    if missing:
        sample = sorted(state_dict)[:3]
        raise _layout_error(source, f"no key {missing[0]!r}; its keys start {sample}")
    vision_sd, text_sd, head_sd, unknown = {}, {}, {}, []
    for key, value in state_dict.items():
        if key in UNUSED_KEYS:
            continue
        if key.startswith(VISION_PREFIX):
            new = _vision_key(key[len(VISION_PREFIX):])
            if new is None:
                unknown.append(key)
            else:
                vision_sd[new] = value
        elif key.startswith(TEXT_PREFIX):
            text_sd[key[len(TEXT_PREFIX):]] = value
        elif key.startswith(HEAD_PREFIX):
            head_sd[key[len(HEAD_PREFIX):]] = value
        else:
            unknown.append(key)
    if unknown:
        raise _layout_error(source, f"unexpected keys {sorted(unknown)[:3]}")

    patch_w = vision_sd["embeddings.patch_embedding.weight"]  # [width, 3, p, p]
    pos = vision_sd["embeddings.position_embedding"]  # [1, 1 + g², width]
    if patch_w.ndim != 4 or patch_w.shape[-1] != patch_w.shape[-2]:
        raise _layout_error(source, f"patch_embed.proj.weight {tuple(patch_w.shape)} is not [width, 3, p, p]")
    width, patch = int(patch_w.shape[0]), int(patch_w.shape[-1])
    grid = math.isqrt(max(0, int(pos.shape[1]) - 1)) if pos.ndim == 3 else 0
    if pos.ndim != 3 or grid < 1 or grid * grid != int(pos.shape[1]) - 1 or int(pos.shape[2]) != width:
        raise _layout_error(source, f"pos_embed {tuple(pos.shape)} is not [1, 1 + grid², {width}]")
    blocks = sorted({int(k.split(".")[2]) for k in vision_sd if k.startswith("encoder.layers.")})
    if not blocks or blocks != list(range(len(blocks))) or "encoder.layers.0.mlp.fc1.weight" not in vision_sd:
        raise _layout_error(source, "no complete visual_encoder.blocks.{i}")
    vision_config = BlipVisionConfig(
        hidden_size=width, intermediate_size=int(vision_sd["encoder.layers.0.mlp.fc1.weight"].shape[0]),
        num_hidden_layers=len(blocks), num_attention_heads=check_heads(REWARD, "vision_heads", width, vision_heads, HEADS_HINT),
        image_size=grid * patch, patch_size=patch, hidden_act="gelu", layer_norm_eps=1e-6, attention_dropout=0.0)

    words = text_sd["embeddings.word_embeddings.weight"]  # [vocab, hidden]
    layers = sorted({int(k.split(".")[2]) for k in text_sd if k.startswith("encoder.layer.")})
    cross_k = "encoder.layer.0.crossattention.self.key.weight"  # [hidden, encoder width]
    if not layers or layers != list(range(len(layers))) or cross_k not in text_sd:
        raise _layout_error(source, "no text_encoder.encoder.layer.{i} with crossattention")
    hidden = int(words.shape[1])
    if int(text_sd[cross_k].shape[1]) != width:
        raise _layout_error(source, f"the text cross-attention reads width {int(text_sd[cross_k].shape[1])}, "
                                    f"the image encoder gives {width}")
    text_config = BlipTextConfig(
        vocab_size=int(words.shape[0]), hidden_size=hidden, encoder_hidden_size=width,
        intermediate_size=int(text_sd["encoder.layer.0.intermediate.dense.weight"].shape[0])
        if "encoder.layer.0.intermediate.dense.weight" in text_sd else 4 * hidden,
        num_hidden_layers=len(layers), num_attention_heads=check_heads(REWARD, "text_heads", hidden, text_heads, HEADS_HINT),
        max_position_embeddings=int(text_sd["embeddings.position_embeddings.weight"].shape[0]),
        hidden_act="gelu", layer_norm_eps=1e-12, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        is_decoder=True, pad_token_id=0, bos_token_id=None, eos_token_id=None, sep_token_id=None)
    if int(head_sd["layers.0.weight"].shape[1]) != hidden:
        raise _layout_error(source, f"the mlp head reads {int(head_sd['layers.0.weight'].shape[1])} features, "
                                    f"the text encoder gives {hidden}")
    return vision_config, text_config, vision_sd, text_sd, head_sd


def _load(module: torch.nn.Module, state: dict, source: str) -> None:
    try:
        load_strict(module, state, REWARD, source)
    except RuntimeError as e:  # a shape mismatch
        raise RewardOptionError(f"reward {REWARD!r}: {source} does not match the model "
                                f"({str(e).splitlines()[-1].strip()}); is it ImageReward.pt?") from None


class ImageReward:
    """ImageReward v1.0. Options: path (ImageReward.pt, or a .safetensors of the same keys),
    processor_path (a bert-base-uncased tokenizer folder; BLIP's [DEC]/[ENC] are added when missing),
    vision_heads, text_heads, device, dtype, quantize."""

    def __init__(self, path: str | None = None, processor_path: str | None = None, vision_heads: int = 16,
                 text_heads: int = 12, device: str = "auto", dtype: str = "float32", quantize: bool = True):
        from transformers import BertTokenizer, BlipTextModel, BlipVisionModel

        from flowpo.rewards.clip import MLPHead  # the same 768→1024→128→64→16→1 stack, same indices

        ckpt = need_path(REWARD, "path", path, "ImageReward.pt", folder=False)
        tok_dir = need_path(REWARD, "processor_path", processor_path, "bert-base-uncased (its tokenizer)",
                            folder=True)
        if not any((tok_dir / name).is_file() for name in ("vocab.txt", "tokenizer.json")):
            raise RewardOptionError(f"reward.options.{REWARD}.processor_path={processor_path!r} holds no vocab.txt or "
                                    "tokenizer.json; point it at the bert-base-uncased tokenizer folder")
        self.device, self.dtype = device_of(device, REWARD), dtype_of(REWARD, dtype)
        self.quantize = quantize
        source = str(ckpt)
        vision_config, text_config, vision_sd, text_sd, head_sd = blip_to_hf(
            read_state_dict(REWARD, "path", ckpt), vision_heads=vision_heads, text_heads=text_heads, source=source)

        tokenizer = from_pretrained(BertTokenizer, REWARD, "processor_path", tok_dir)
        if DEC_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
        if ENC_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [ENC_TOKEN]})
        if len(tokenizer) != text_config.vocab_size:
            raise RewardOptionError(
                f"reward.options.{REWARD}.processor_path={processor_path!r}: the tokenizer has {len(tokenizer)} "
                f"tokens with BLIP's {DEC_TOKEN}/{ENC_TOKEN}, the checkpoint's word embeddings "
                f"{text_config.vocab_size} rows; point it at the bert-base-uncased tokenizer folder "
                "(30522 + 2 = 30524)")
        if text_config.max_position_embeddings < TEXT_LENGTH:
            raise _layout_error(source, f"{text_config.max_position_embeddings} text positions < {TEXT_LENGTH}")
        self.tokenizer = tokenizer
        self.size = int(vision_config.image_size)

        self.vision = BlipVisionModel(vision_config)
        _load(self.vision, vision_sd, source)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        _load(self.text, text_sd, source)
        self.head = MLPHead(text_config.hidden_size)
        _load(self.head, head_sd, source)
        for m, dt in ((self.vision, self.dtype), (self.text, self.dtype), (self.head, torch.float32)):
            m.to(self.device, dt).eval().requires_grad_(False)

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] in [0, 1] → normalised [N, 3, S, S] on the scorer's device and dtype
        (torchvision's crop offsets, as BLIP's transform)."""
        return to_pixels(images, self.size, mode="crop", offset="round", mean=OPENAI_MEAN, std=OPENAI_STD,
                         quantize=self.quantize, device=self.device, dtype=self.dtype)

    @torch.no_grad()
    def score_pixels(self, pixel_values: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Rewards [N] of preprocessed pixels [N, 3, S, S] and their prompts."""
        image_embeds = self.vision(pixel_values=pixel_values.to(self.device, self.dtype)).last_hidden_state
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=TEXT_LENGTH,
                             return_tensors="pt")
        image_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=self.device)
        out = self.text(input_ids=tok["input_ids"].to(self.device),
                        attention_mask=tok["attention_mask"].to(self.device), encoder_hidden_states=image_embeds,
                        encoder_attention_mask=image_mask, is_decoder=False)
        r = self.head(out.last_hidden_state[:, 0].float()).squeeze(-1)
        return (r - MEAN) / STD

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str], metadata=None) -> torch.Tensor:
        if images.shape[0] != len(prompts):
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        return self.score_pixels(self.pixels(images), prompts)
