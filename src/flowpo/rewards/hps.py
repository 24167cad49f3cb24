"""`hpsv2`: Human Preference Score v2 / v2.1 (Wu et al., "Human Preference Score v2: A Solid
Benchmark for Evaluating Human Preferences of Text-to-Image Synthesis", arXiv 2306.09341).

HPSv2 is an open_clip ViT-H-14 CLIP fine-tuned on the HPD v2 human preference pairs. The score of
an image x for a prompt y is the cosine of the L2-normalised CLIP features, with no logit scale:

    s(x, y) = ⟨f_img(x) / ‖f_img(x)‖, f_txt(y) / ‖f_txt(y)‖⟩        ∈ [−1, 1]

Weights: `HPS_v2.1_compressed.pt` (or `HPS_v2_compressed.pt`), a torch pickle whose model state dict
sits under the key `state_dict` (keys sometimes carry a DataParallel `module.` prefix, stripped
here), or a .safetensors of that state dict. It is read with `weights_only=True` and converted at load
onto transformers' CLIPModel, so the forward is HF's well-tested one.

Preprocessing (open_clip's validation transform with `resize_longest_max=True`, what HPSv2 scores
with; not CLIP's centre crop): resize the longest side to the model's image size (224, bicubic),
zero-pad to a centred square, normalise with the OpenAI CLIP mean/std (flowpo.rewards.preprocess,
mode="pad"; batched on the scorer's device).

Text: the open_clip tokenizer, i.e. CLIP's BPE (the tokenizer folder of
laion/CLIP-ViT-H-14-laion2B-s32B-b79K works): [sot] tokens [eot], truncated and padded to the
checkpoint's context length (77). open_clip pools at `argmax(token ids)`, which is the eot because
eot is the largest id; HF's CLIPTextModel pools at the first `config.eos_token_id`, which is set from
the tokenizer here (padding after the eot does not matter: the text transformer is causal).

Key mapping (open_clip → transformers CLIPModel); the architecture is read off the tensor shapes,
the head counts are options (ViT-H-14: 16 and 16); GELU is exact (hidden_act="gelu"), LayerNorm
eps 1e-5:

    token_embedding.weight                  text_model.embeddings.token_embedding.weight
    positional_embedding [ctx, w]           text_model.embeddings.position_embedding.weight
    transformer.resblocks.{i}.*             text_model.encoder.layers.{i}.*  (block map below)
    ln_final.*                              text_model.final_layer_norm.*
    text_projection [w, e] (x @ P)          text_projection.weight = Pᵀ
    logit_scale                             logit_scale (unused by the score)
    visual.class_embedding [w]              vision_model.embeddings.class_embedding
    visual.positional_embedding [1+g², w]   vision_model.embeddings.position_embedding.weight
    visual.conv1.weight (no bias)           vision_model.embeddings.patch_embedding.weight
    visual.ln_pre.*                         vision_model.pre_layrnorm.*  (HF's spelling)
    visual.transformer.resblocks.{i}.*      vision_model.encoder.layers.{i}.*
    visual.ln_post.*                        vision_model.post_layernorm.*
    visual.proj [w, e]                      visual_projection.weight = projᵀ
  block:
    ln_1.* / ln_2.*                         layer_norm1.* / layer_norm2.*
    attn.in_proj_weight/bias [3w, (w)]      self_attn.{q,k,v}_proj.weight/bias  (split in 3 along dim 0)
    attn.out_proj.*                         self_attn.out_proj.*
    mlp.c_fc.* / mlp.c_proj.*               mlp.fc1.* / mlp.fc2.*

Loading is strict: a source key that maps nowhere or a CLIPModel parameter left unset is an error,
except the non-parameter buffers in `DROPPED_BUFFERS` that some open_clip versions save.
"""
from __future__ import annotations

import contextlib
import re

import torch

from flowpo.rewards.loading import RewardOptionError, check_heads, device_of, dtype_of, from_pretrained, \
    load_strict, need_path, read_state_dict
from flowpo.rewards.preprocess import OPENAI_MEAN, OPENAI_STD, to_pixels

REWARD = "hpsv2"

# Non-parameter buffers that some open_clip versions persist in the state dict; they carry no
# weights (the text tower's causal mask, rebuilt by HF), so they are dropped by name, nothing else.
DROPPED_BUFFERS = ("attn_mask",)

# Keys whose absence means "this is not an open_clip CLIP checkpoint" (checked before anything else).
_REQUIRED = ("visual.conv1.weight", "visual.positional_embedding", "visual.class_embedding", "visual.proj",
             "token_embedding.weight", "positional_embedding", "ln_final.weight")

_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
_BLOCK_MAP = {
    "ln_1.weight": "layer_norm1.weight", "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight", "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight", "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias",
}
_DIRECT = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "text_projection.weight": "text_projection.weight",  # open_clip versions where it is an nn.Linear
}


def strip_prefix(state_dict: dict, prefix: str = "module.") -> dict:
    """Drop a DataParallel/DDP `module.` prefix from the keys that carry it."""
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def _depth(state_dict: dict, tower: str) -> int:
    """Number of resblocks of the text (`tower`="") or visual (`tower`="visual.") transformer."""
    idx = {int(m.group(2)) for k in state_dict if (m := _BLOCK.match(k)) and (m.group(1) or "") == tower}
    return max(idx) + 1 if idx else 0


def openclip_to_hf(state_dict: dict, *, vision_heads: int = 16, text_heads: int = 16, tokenizer=None,
                   source: str = "the checkpoint"):
    """An open_clip CLIP state dict → (transformers CLIPConfig, CLIPModel state dict).

    Widths, depths, MLP width, patch and image size, context length, vocabulary and projection size
    are read from the tensor shapes; the head counts are given. `tokenizer` supplies the bos/eos/pad
    ids (the eos sets where the text tower pools). Every source key must map somewhere (else
    RewardOptionError naming it), except `DROPPED_BUFFERS`.
    """
    from transformers import CLIPConfig

    sd = strip_prefix(dict(state_dict))
    missing = [k for k in _REQUIRED if k not in sd]
    if missing or ("text_projection" not in sd and "text_projection.weight" not in sd):
        first = missing[0] if missing else "text_projection"
        raise RewardOptionError(f"reward {REWARD!r}: {source} is not an open_clip CLIP state dict (no {first!r}; "
                                f"it has {sorted(sd)[:3]}…); give HPS_v2.1_compressed.pt or a .safetensors of it")
    try:
        v_width, channels, patch, patch_w = sd["visual.conv1.weight"].shape
        n_pos, v_pos_width = sd["visual.positional_embedding"].shape
        vocab, t_width = sd["token_embedding.weight"].shape
        ctx, t_pos_width = sd["positional_embedding"].shape
        v_proj = sd["visual.proj"]
        t_proj = sd["text_projection"].T if "text_projection" in sd else sd["text_projection.weight"]
        embed = int(v_proj.shape[1])
        grid = round((n_pos - 1) ** 0.5)
        if (patch != patch_w or v_pos_width != v_width or t_pos_width != t_width or grid * grid != n_pos - 1
                or v_proj.shape[0] != v_width or tuple(t_proj.shape) != (embed, t_width)):
            raise ValueError("inconsistent shapes")
        v_depth, t_depth = _depth(sd, "visual."), _depth(sd, "")
        v_mlp = int(sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0])
        t_mlp = int(sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0])
    except (KeyError, ValueError, TypeError, AttributeError, IndexError, RuntimeError) as e:
        raise RewardOptionError(f"reward {REWARD!r}: {source} does not have open_clip ViT shapes ({type(e).__name__}: "
                                f"{e}); give HPS_v2.1_compressed.pt or a .safetensors of it") from None
    check_heads(REWARD, "vision_heads", int(v_width), vision_heads, "ViT-H-14 (HPSv2) uses 16")
    check_heads(REWARD, "text_heads", int(t_width), text_heads, "ViT-H-14 (HPSv2) uses 16")

    ids = {}
    if tokenizer is not None:
        eos = tokenizer.eos_token_id
        if eos is None:
            raise RewardOptionError(f"reward.options.{REWARD}.processor_path: the tokenizer has no eos (<|endoftext|>) "
                                    "token; point it at the CLIP tokenizer folder")
        if len(tokenizer) > vocab:
            raise RewardOptionError(f"reward.options.{REWARD}.processor_path: the tokenizer has {len(tokenizer)} "
                                    f"tokens but {source} embeds {vocab}; is it the CLIP (ViT-H-14) tokenizer?")
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        ids = dict(bos_token_id=int(bos), eos_token_id=int(eos), pad_token_id=int(pad))
    text = dict(vocab_size=int(vocab), hidden_size=int(t_width), intermediate_size=t_mlp, num_hidden_layers=t_depth,
                num_attention_heads=text_heads, max_position_embeddings=int(ctx), hidden_act="gelu",
                layer_norm_eps=1e-5, projection_dim=embed, **ids)
    vision = dict(hidden_size=int(v_width), intermediate_size=v_mlp, num_hidden_layers=v_depth,
                  num_attention_heads=vision_heads, image_size=int(grid * patch), patch_size=int(patch),
                  num_channels=int(channels), hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=embed)
    scale = float(sd["logit_scale"].float().reshape(-1)[0]) if "logit_scale" in sd else 2.6592
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=embed, logit_scale_init_value=scale)

    out, unused = {}, []
    for k, v in sd.items():
        if k in DROPPED_BUFFERS:
            continue
        if k in _DIRECT:
            out[_DIRECT[k]] = v
        elif k == "text_projection":
            out["text_projection.weight"] = v.T.contiguous()
        elif k == "visual.proj":
            out["visual_projection.weight"] = v.T.contiguous()
        elif m := _BLOCK.match(k):
            dst = f"{'vision' if m.group(1) else 'text'}_model.encoder.layers.{m.group(2)}."
            rest = m.group(3)
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = "weight" if rest.endswith("weight") else "bias"
                if v.shape[0] % 3:
                    unused.append(k)
                    continue
                for name, part in zip(("q", "k", "v"), v.chunk(3, dim=0)):
                    out[f"{dst}self_attn.{name}_proj.{kind}"] = part.contiguous()
            elif rest in _BLOCK_MAP:
                out[dst + _BLOCK_MAP[rest]] = v
            else:
                unused.append(k)
        else:
            unused.append(k)
    if unused:
        raise RewardOptionError(f"reward {REWARD!r}: {source} has keys that are not open_clip ViT CLIP weights "
                                f"({unused[:3]}{' …' if len(unused) > 3 else ''}); is it the HPSv2 checkpoint?")
    return config, out


def _no_init():
    """transformers' no_init_weights (skip the random init of ~1B parameters about to be overwritten),
    or nothing where this transformers does not have it."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def build_clip(config, hf_state: dict, source: str):
    """A CLIPModel of `config` with `hf_state` loaded strictly (fp32, CPU, eval, frozen)."""
    from transformers import CLIPModel

    with _no_init():
        model = CLIPModel(config)
    load_strict(model, hf_state, REWARD, source)
    return model.eval().requires_grad_(False)


class HPSv2:
    """HPSv2 / HPSv2.1. Options: path (HPS_v2.1_compressed.pt, or a .safetensors of its state dict),
    processor_path (the CLIP tokenizer folder, e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K),
    vision_heads and text_heads (ViT-H-14: 16, 16), device, dtype, quantize (score the uint8 image)."""

    def __init__(self, path: str | None = None, processor_path: str | None = None, vision_heads: int = 16,
                 text_heads: int = 16, device: str = "auto", dtype: str = "float32", quantize: bool = True):
        from transformers import AutoTokenizer

        ckpt = need_path(REWARD, "path", path, "HPS_v2.1_compressed.pt", folder=False)
        tok_dir = need_path(REWARD, "processor_path", processor_path,
                            "the CLIP tokenizer folder (laion/CLIP-ViT-H-14-laion2B-s32B-b79K)", folder=True)
        self.device, self.dtype = device_of(device, REWARD), dtype_of(REWARD, dtype)
        self.tokenizer = from_pretrained(AutoTokenizer, REWARD, "processor_path", tok_dir)
        source = f"reward.options.{REWARD}.path={str(ckpt)!r}"
        config, hf_state = openclip_to_hf(read_state_dict(REWARD, "path", ckpt), vision_heads=int(vision_heads),
                                          text_heads=int(text_heads), tokenizer=self.tokenizer, source=source)
        self.config = config
        self.model = build_clip(config, hf_state, source).to(self.device, self.dtype)
        del hf_state
        self.size = int(config.vision_config.image_size)
        self.context = int(config.text_config.max_position_embeddings)
        self.quantize = bool(quantize)

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] in [0, 1] → [N, 3, S, S]: longest side → S (bicubic), centred zero pad, OpenAI mean/std."""
        return to_pixels(images, self.size, mode="pad", mean=OPENAI_MEAN, std=OPENAI_STD, quantize=self.quantize,
                         device=self.device, dtype=self.dtype)

    def encode_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels → L2-normalised image features [N, E] (fp32)."""
        f = self.model.get_image_features(pixel_values=pixel_values.to(self.device, self.dtype))
        f = getattr(f, "pooler_output", f)  # transformers 5 returns an output object
        return torch.nn.functional.normalize(f.float(), dim=-1)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_pixels(self.pixels(images))

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """[sot] tokens [eot], truncated and padded to the context length → ids [N, ctx]."""
        return self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.context,
                              return_tensors="pt")["input_ids"]

    def text_features(self, prompts: list[str]) -> torch.Tensor:
        """Prompts → L2-normalised text features [N, E] (fp32), pooled at the eot token (causal: no
        padding mask needed, as in open_clip)."""
        f = self.model.get_text_features(input_ids=self.tokenize(prompts).to(self.device))
        f = getattr(f, "pooler_output", f)
        return torch.nn.functional.normalize(f.float(), dim=-1)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str], metadata=None) -> torch.Tensor:
        if images.shape[0] != len(prompts):
            raise ValueError(f"hpsv2 got {images.shape[0]} images but {len(prompts)} prompts")
        if images.shape[0] == 0:
            return torch.zeros(0)
        return (self.image_features(images) * self.text_features(prompts)).sum(-1)
