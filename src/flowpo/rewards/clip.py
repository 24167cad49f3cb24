"""CLIP-based scorers on transformers' CLIPModel, loaded from local folders only.

- `pickscore` (Kirstain et al., arXiv 2305.01569): s = exp(logit_scale) · cos(f_img, f_txt) with
  the PickScore_v1 CLIP-H/14 and the laion CLIP-ViT-H-14 processor. `scaling` picks how the peers
  feed it to GRPO: flow_grpo s/26 (default), mix_grpo (s − 18)/8, cosine (DanceGRPO: cos without
  the logit scale), raw s.
- `clipscore` (Hessel et al., arXiv 2104.08718): 2.5 · max(cos, 0) (scaling=hessel, default), or
  Flow-GRPO's exp(logit_scale)·cos / 30 (scaling=flow_grpo); openai/clip-vit-large-patch14.
- `aesthetic` (LAION improved aesthetic predictor, the DDPO/Flow-GRPO aesthetic reward): the
  L2-normalised CLIP ViT-L/14 image feature through a 768→1024→128→64→16→1 linear stack (no
  activations; dropout at training only), weights `sac+logos+ava1-l14-linearMSE.pth`.

Text: padded and truncated to the tokenizer's max length (77). Images: flowpo.rewards.preprocess
(batched tensors, the processor's size, crop and mean/std).
"""
from __future__ import annotations

import torch

from flowpo.rewards.loading import device_of, dtype_of, from_pretrained, need_path, read_state_dict, \
    RewardOptionError
from flowpo.rewards.preprocess import processor_geometry, to_pixels


class _CLIP:
    """A CLIPModel with its tokenizer and image geometry, frozen, on `device` in `dtype`."""

    reward = "clip"
    what = "a CLIP model folder"

    def __init__(self, path: str | None, processor_path: str | None, device: str, dtype: str,
                 quantize: bool = True):
        from transformers import AutoProcessor, CLIPModel

        model_dir = need_path(self.reward, "path", path, self.what, folder=True)
        proc_dir = need_path(self.reward, "processor_path", processor_path, "the CLIP processor folder",
                             folder=True) if processor_path else model_dir
        self.device, self.dtype = device_of(device, self.reward), dtype_of(self.reward, dtype)
        model = from_pretrained(CLIPModel, self.reward, "path", model_dir)
        self.logit_scale = float(model.logit_scale.float().exp())  # fp32, before a bf16/fp16 cast rounds it
        self.model = model.to(self.device, self.dtype).eval().requires_grad_(False)
        proc = from_pretrained(AutoProcessor, self.reward, "processor_path" if processor_path else "path", proc_dir)
        self.tokenizer = getattr(proc, "tokenizer", proc)
        # CLIP's text length (77): the model's positions bound it (a tokenizer folder without
        # model_max_length reports a huge default)
        self.text_length = min(int(getattr(self.tokenizer, "model_max_length", 77) or 77),
                               int(model.config.text_config.max_position_embeddings))
        image_proc = getattr(proc, "image_processor", None)
        if image_proc is None:
            raise RewardOptionError(f"reward {self.reward!r}: {proc_dir} has no image processor config "
                                    "(preprocessor_config.json); point processor_path at the CLIP processor folder")
        self.size, self.crop, self.mean, self.std = processor_geometry(image_proc)
        self.quantize = quantize

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        return to_pixels(images, self.size, mode="crop", crop=self.crop, mean=self.mean, std=self.std,
                         quantize=self.quantize, device=self.device, dtype=self.dtype)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        f = self.model.get_image_features(pixel_values=self.pixels(images))
        f = getattr(f, "pooler_output", f)  # transformers 5 returns an output object
        return torch.nn.functional.normalize(f.float(), dim=-1)

    def text_features(self, prompts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                             max_length=self.text_length, return_tensors="pt")
        f = self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                         attention_mask=tok["attention_mask"].to(self.device))
        f = getattr(f, "pooler_output", f)
        return torch.nn.functional.normalize(f.float(), dim=-1)

    def cosine(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return (self.image_features(images) * self.text_features(prompts)).sum(-1)


class _ScaledCLIP(_CLIP):
    """A CLIP score s(cos, exp(logit_scale)) picked by name from `scalings` (option `scaling`)."""

    scalings: dict = {}

    def __init__(self, path: str | None, processor_path: str | None, scaling: str, device: str, dtype: str,
                 quantize: bool):
        if scaling not in self.scalings:
            raise RewardOptionError(f"reward.options.{self.reward}.scaling={scaling!r} is unknown; choose one of "
                                    f"{list(self.scalings)}")
        super().__init__(path, processor_path, device, dtype, quantize)
        self.scale = self.scalings[scaling]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str], metadata=None) -> torch.Tensor:
        return self.scale(self.cosine(images, prompts), self.logit_scale)


class PickScore(_ScaledCLIP):
    """PickScore_v1. Options: path (the PickScore_v1 folder), processor_path (the
    laion/CLIP-ViT-H-14-laion2B-s32B-b79K folder), scaling, device, dtype."""

    reward = "pickscore"
    what = "PickScore_v1 (yuvalkirstain/PickScore_v1)"
    scalings = {"flow_grpo": lambda cos, ls: ls * cos / 26.0, "mix_grpo": lambda cos, ls: (ls * cos - 18.0) / 8.0,
                "cosine": lambda cos, ls: cos, "raw": lambda cos, ls: ls * cos}

    def __init__(self, path: str | None = None, processor_path: str | None = None, scaling: str = "flow_grpo",
                 device: str = "auto", dtype: str = "float32", quantize: bool = True):
        super().__init__(path, processor_path, scaling, device, dtype, quantize)


class CLIPScore(_ScaledCLIP):
    """CLIPScore. Options: path (a CLIP folder, e.g. openai/clip-vit-large-patch14),
    processor_path (default: path), scaling (hessel | flow_grpo), device, dtype."""

    reward = "clipscore"
    what = "a CLIP model (e.g. openai/clip-vit-large-patch14)"
    scalings = {"hessel": lambda cos, ls: 2.5 * cos.clamp_min(0), "flow_grpo": lambda cos, ls: ls * cos / 30.0}

    def __init__(self, path: str | None = None, processor_path: str | None = None, scaling: str = "hessel",
                 device: str = "auto", dtype: str = "float32", quantize: bool = True):
        super().__init__(path, processor_path, scaling, device, dtype, quantize)


class MLPHead(torch.nn.Module):
    """768→1024→128→64→16→1, linear layers at indices 0, 2, 4, 6, 7 of `layers` (dropouts between,
    identity at inference) so that the LAION state dict loads as it is."""

    def __init__(self, dim: int = 768):
        super().__init__()
        widths = [dim, 1024, 128, 64, 16, 1]
        mods: list[torch.nn.Module] = []
        for i, (a, b) in enumerate(zip(widths, widths[1:])):
            mods.append(torch.nn.Linear(a, b))
            if i < 3:
                mods.append(torch.nn.Dropout(0.0))
        self.layers = torch.nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Aesthetic(_CLIP):
    """LAION aesthetic predictor v2. Options: path (openai/clip-vit-large-patch14 folder),
    head (`sac+logos+ava1-l14-linearMSE.pth`, or a .safetensors of it), processor_path, device, dtype."""

    reward = "aesthetic"
    what = "openai/clip-vit-large-patch14"

    def __init__(self, path: str | None = None, head: str | None = None, processor_path: str | None = None,
                 device: str = "auto", dtype: str = "float32", quantize: bool = True):
        head_file = need_path("aesthetic", "head", head, "sac+logos+ava1-l14-linearMSE.pth", folder=False)
        super().__init__(path, processor_path, device, dtype, quantize)
        from flowpo.rewards.loading import load_strict

        dim = int(self.model.config.projection_dim)
        self.head = MLPHead(dim)
        load_strict(self.head, read_state_dict("aesthetic", "head", head_file), "aesthetic", str(head_file))
        self.head.to(self.device, torch.float32).eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str], metadata=None) -> torch.Tensor:
        return self.head(self.image_features(images)).squeeze(-1)
