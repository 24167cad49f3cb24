"""Qwen-Image-Edit-2509 / -2511 (QwenImageEditPlusPipeline) behind the `Policy` interface.

    policy = QwenImageEditPolicy.from_pretrained("/models/Qwen-Image-Edit-2511", dtype="bf16", resolution=1024)
    cond = policy.encode_prompts(["make the sky purple"], [("/data/street.png",)])
    v = policy.velocity(x, sigma, cond, guidance=4.0)

What QwenImageEditPlusPipeline (diffusers 0.42.1) does, reproduced here (QwenImagePolicy for the
packing, the VAE latent normalisation, the σ grid and the rescaled true CFG):
- each source image goes twice through the pipeline's image processor: resized (Lanczos) to
  about `vl_area` = 384² px for the Qwen2.5-VL encoder and to about `vae_area` = 1024² px for the
  VAE, at its aspect ratio, sides rounded to 32 (`calculate_dimensions`);
- text: the edit chat template around "Picture 1: <|vision_start|><|image_pad|><|vision_end|>…" (one
  prefix per source) + the instruction; the VL images become Qwen2-VL's pixel patches and grid
  (flowpo.policy.qwen_vl_inputs, no torchvision) and each image pad expands to its merged patch
  count; the last hidden state is taken and its first 64 positions (the template's system part,
  `prompt_template_encode_start_idx`) dropped;
- the VAE sources: the latent distribution's mode, normalised (z − mean)/std, 2×2-packed and
  appended after the noise tokens; `img_shapes` per row lists the noise grid then each source's;
  the prediction is sliced back to the noise tokens;
- μ of the σ grid from the noise tokens only; true CFG with the negative prompt " " (encoded
  with the same source images), v = v̂·‖v_c‖/‖v̂‖ per token (QwenImagePolicy's `rescaled_cfg`);
- 2511: the transformer's `zero_cond_t` (its config) runs the reference tokens at t = 0; the
  policy passes the same inputs, the transformer does the rest.

Each (prompt, sources) pair is encoded once, with its negative (the prompt cache keys both; see
flowpo.policy.edit). Rows of one call must share the sources' sizes (count and aspect ratio).
"""
from __future__ import annotations

from pathlib import Path

import torch

from flowpo.errors import ConfigError
from flowpo.policy.base import Cond
from flowpo.policy.diffusers_common import Mode, autocast, load_pipeline, resolve_dtype
from flowpo.policy.edit import BLANK, open_source
from flowpo.policy.qwen_image import QwenImagePolicy, pack_latents, rescaled_cfg, unpack_latents
from flowpo.policy.qwen_vl_inputs import VLImageConfig, expand_image_pads, image_inputs

VL_AREA = 384 * 384     # the pipeline's CONDITION_IMAGE_SIZE
VAE_AREA = 1024 * 1024  # the pipeline's VAE_IMAGE_SIZE
PICTURE = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"


def calculate_dimensions(area: int, ratio: float) -> tuple[int, int]:
    """(width, height) of about `area` px at aspect `ratio` = w/h, sides rounded to multiples of 32."""
    width = (area * ratio) ** 0.5
    return round(width / 32) * 32, round(width / ratio / 32) * 32


class QwenImageEditPolicy(QwenImagePolicy):
    """A QwenImageEditPlusPipeline's transformer as the policy; Qwen2.5-VL and the VAE frozen.

    Args: QwenImagePolicy's (max_sequence_length: the longest encoded text, vision tokens
    included, default 1024; prompt_cache_size default 256: a cached pair holds the prompt's and the
    negative's padded hidden states, ≈ 15 MB at 1024 tokens of Qwen2.5-VL-7B in bf16), and
        image_resolution: the VAE sources' area as a side s (s² px at the source's aspect); None =
            the pipeline's 1024² (each 1024² source adds 4096 tokens to the transformer's sequence).
        vl_area: source pixels for the VL encoder (the pipeline's 384²).
        vl_image_config: Qwen2-VL's image preprocessing (read from the folder's
            processor/preprocessor_config.json by `from_pretrained`).
    """

    pipeline_class_name = "QwenImageEditPlusPipeline"
    model_kind = "qwen_image_edit"
    edits = True

    def __init__(
        self,
        pipe,
        *,
        dtype: str | torch.dtype = "fp32",
        mode: Mode = "lora",
        lora_rank: int = 64,
        lora_alpha: float = 128,
        lora_targets: list[str] | None = None,
        resolution: int | tuple[int, int] | None = None,
        gradient_checkpointing: bool = False,
        device: str | torch.device = "cpu",
        max_sequence_length: int = 1024,
        prompt_cache_size: int = 256,
        cfg_grad: str = "conditional",
        negative_prompt: str = " ",
        cfg_norm_rescale: bool = True,
        image_resolution: int | None = None,
        vl_area: int = VL_AREA,
        vl_image_config: VLImageConfig | None = None,
    ):
        super().__init__(pipe, dtype=dtype, mode=mode, lora_rank=lora_rank, lora_alpha=lora_alpha,
                         lora_targets=lora_targets, resolution=resolution,
                         gradient_checkpointing=gradient_checkpointing, device=device,
                         max_sequence_length=max_sequence_length, prompt_cache_size=prompt_cache_size,
                         cfg_grad=cfg_grad, negative_prompt=negative_prompt, cfg_norm_rescale=cfg_norm_rescale)
        if image_resolution is not None and image_resolution < 32:
            raise ValueError(f"model.image_resolution={image_resolution}: the sources' side must be at least 32 px")
        self.vl_area = int(vl_area)
        self.vae_area = VAE_AREA if image_resolution is None else int(image_resolution) ** 2
        self.vl = vl_image_config or VLImageConfig()
        self.sizes: tuple | None = None  # per source: ((vl_w, vl_h), (vae_w, vae_h)), fixed by the first row

    @classmethod
    def from_pretrained(cls, path: str | Path, **options) -> "QwenImageEditPolicy":
        """Load a local QwenImageEditPlusPipeline folder without its Qwen2VLProcessor (which needs
        torchvision): the image preprocessing comes from processor/preprocessor_config.json."""
        import inspect

        bound = inspect.signature(cls).bind(None, **options)
        bound.apply_defaults()
        pipe = load_pipeline(cls.pipeline_class_name, path, cls.model_kind, resolve_dtype(bound.arguments["dtype"]),
                             processor=None)
        proc = Path(path) / "processor"
        if "vl_image_config" not in options:
            options["vl_image_config"] = VLImageConfig.from_folder(proc) \
                if (proc / "preprocessor_config.json").is_file() else VLImageConfig()
        return cls(pipe, **options)

    # -- Policy interface ---------------------------------------------------------------------

    def encode_prompts(self, prompts: list[str], images: list[tuple[str, ...]] | None = None) -> Cond:
        """{"prompt_embeds", "prompt_mask", "negative_embeds", "negative_mask": [N, L, D] / [N, L]
        (zero-padded to max_sequence_length), "image_tokens": [N, S_img, 4C] packed source latents}."""
        if images is None or len(images) != len(prompts):
            raise ValueError("qwen_image_edit edits images: encode_prompts(prompts, images) needs one tuple of "
                             "source image paths per prompt (flowpo.policy.edit.encode_rows)")
        if not prompts:  # the shape of a row, no rows (an empty lock-step call)
            n = len(self.sizes) if self.sizes else 1
            return {k: v[:0] for k, v in self._prompts.get([("", (BLANK,) * n)]).items()}
        return self._prompts.get([(p, tuple(imgs)) for p, imgs in zip(prompts, images)])

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, guidance: float) -> torch.Tensor:
        n, _, h, w = x.shape
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(n)  # [N]
        noise = pack_latents(x)                                                                 # [N, S, 4C]
        tokens = torch.cat([noise, cond["image_tokens"].to(noise.device, noise.dtype)], dim=1)  # [N, S + S_img, 4C]
        s = noise.shape[1]
        if guidance == 1.0:
            out = self._edit_call(tokens, sigma, cond["prompt_embeds"], cond["prompt_mask"], h, w)
            return unpack_latents(out[:, :s].float(), h, w)
        embeds = torch.cat([cond["negative_embeds"], cond["prompt_embeds"]])                   # [2N, L, D]
        mask = torch.cat([cond["negative_mask"], cond["prompt_mask"]])
        out = self._edit_call(torch.cat([tokens, tokens]), torch.cat([sigma, sigma]), embeds, mask, h, w)
        v_u, v_c = out[:, :s].float().chunk(2)
        if self.cfg_grad == "conditional":
            v_u = v_u.detach()
        return unpack_latents(rescaled_cfg(v_u, v_c, guidance, self.cfg_norm_rescale), h, w)

    def negative(self, cond: Cond) -> Cond:
        """The unconditional rows of true CFG for the rows of `cond` (flowpo.guided): the negative
        prompt encoded with each row's own sources, and the same source latents."""
        return {**cond, "prompt_embeds": cond["negative_embeds"], "prompt_mask": cond["negative_mask"]}

    def source_layout(self, paths: tuple[str, ...]) -> str:
        """The VAE sizes (w × h px) the sources at `paths` get, read from their headers."""
        from PIL import Image

        sizes = []
        for p in paths:
            with Image.open(p) as im:
                sizes.append("%d×%d" % calculate_dimensions(self.vae_area, im.width / im.height))
        return f"{len(paths)} source(s) of {', '.join(sizes)} px"

    # -- internals ----------------------------------------------------------------------------

    def _edit_call(self, tokens, sigma, embeds, mask, h: int, w: int) -> torch.Tensor:
        """The transformer on [noise; source] tokens with per-segment img_shapes, text trimmed to
        the batch's longest (mask None when no row is padded, as the pipeline)."""
        scale = self.pipe.vae_scale_factor
        shapes = [(1, h // 2, w // 2)] + [(1, vh // scale // 2, vw // scale // 2) for _, (vw, vh) in self.sizes]
        mask = mask.bool()
        length = max(1, int(mask.sum(dim=1).max()))  # ≥ 1: a lock-step dummy row has no text
        embeds, mask = embeds[:, :length], mask[:, :length]
        with autocast(self.device, self.dtype):
            return self._trainable.active(
                hidden_states=tokens.to(self.dtype), timestep=sigma, encoder_hidden_states=embeds.to(self.dtype),
                encoder_hidden_states_mask=None if bool(mask.all()) else mask,
                img_shapes=[shapes] * tokens.shape[0], return_dict=False,
            )[0]

    def _source_sizes(self, imgs) -> tuple:
        sizes = tuple((calculate_dimensions(self.vl_area, im.width / im.height),
                       calculate_dimensions(self.vae_area, im.width / im.height)) for im in imgs)
        if self.sizes is None:
            self.sizes = sizes
        elif sizes != self.sizes:
            raise ConfigError(f"source images give condition sizes {[s[1] for s in sizes]} px, but earlier rows "
                              f"gave {[s[1] for s in self.sizes]}: rows must name the same number of source "
                              "images with the same aspect ratios (resize them beforehand)")
        return sizes

    @torch.no_grad()
    def _encode_key(self, prompt: str, paths: tuple[str, ...]) -> Cond:
        blank = all(p == BLANK for p in paths)
        if blank and self.sizes is not None:  # a shape-only row: the sizes of the rows before it
            imgs, sizes = [open_source(BLANK, vae) for _, vae in self.sizes], self.sizes
        else:
            imgs = [open_source(p) for p in paths]
            sizes = self._source_sizes(imgs)
        proc = self.pipe.image_processor
        vl_images = [proc.resize(im, vl_h, vl_w) for im, ((vl_w, vl_h), _) in zip(imgs, sizes)]
        pos, pos_mask = self._vl_encode(prompt, vl_images)
        neg, neg_mask = self._vl_encode(self.negative_prompt, vl_images)
        return {"prompt_embeds": pos, "prompt_mask": pos_mask, "negative_embeds": neg, "negative_mask": neg_mask,
                "image_tokens": self._vae_tokens(imgs, sizes)}

    def _vl_encode(self, prompt: str, vl_images: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Qwen2.5-VL's last hidden state of the templated prompt with its images, the first
        `prompt_template_encode_start_idx` positions dropped, zero-padded to max_sequence_length."""
        pipe = self.pipe
        pixels, grid = image_inputs(vl_images, self.vl)
        prefix = "".join(PICTURE.format(i + 1) for i in range(len(vl_images)))
        text = expand_image_pads(pipe.prompt_template_encode.format(prefix + prompt), grid, self.vl.merge_size)
        tok = pipe.tokenizer([text], padding=True, return_tensors="pt").to(self.device)
        enc = pipe.text_encoder
        out = enc(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                  pixel_values=pixels.to(self.device, next(enc.parameters()).dtype), image_grid_thw=grid.to(self.device),
                  output_hidden_states=True)
        hidden = out.hidden_states[-1][0][tok["attention_mask"][0].bool()][pipe.prompt_template_encode_start_idx:]
        length, dim = hidden.shape
        if length > self.max_sequence_length:
            raise ConfigError(f"an edit prompt with its {len(vl_images)} source image(s) encodes to {length} tokens, "
                              f"more than model.max_sequence_length={self.max_sequence_length}; raise it (at most "
                              "1024) or shorten the prompt")
        pad = self.max_sequence_length - length
        mask = torch.cat([torch.ones(length, dtype=torch.long), torch.zeros(pad, dtype=torch.long)]).to(hidden.device)
        return torch.cat([hidden, hidden.new_zeros(pad, dim)]), mask

    def _vae_tokens(self, imgs, sizes) -> torch.Tensor:
        """The sources as the pipeline's image latents: [S_img, 4C], one packed segment per source."""
        proc, vae = self.pipe.image_processor, self.pipe.vae
        param = next(vae.parameters())
        c = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32, device=param.device).view(1, c, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std, dtype=torch.float32, device=param.device).view(1, c, 1, 1, 1)
        segments = []
        for im, (_, (vae_w, vae_h)) in zip(imgs, sizes):
            pixels = proc.preprocess(im, vae_h, vae_w).unsqueeze(2)                         # [1, 3, 1, H, W]
            z = vae.encode(pixels.to(param.device, param.dtype)).latent_dist.mode().float()
            segments.append(pack_latents(((z - mean) / std)[:, :, 0])[0])
        return torch.cat(segments)

    def _encode(self, keys: list[tuple[str, tuple[str, ...]]]) -> Cond:
        rows = [self._encode_key(p, paths) for p, paths in keys]
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
