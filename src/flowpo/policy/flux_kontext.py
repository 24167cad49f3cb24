"""FLUX.1-Kontext (image editing by in-context reference tokens) behind the `Policy` interface.

    policy = FluxKontextPolicy.from_pretrained("/models/FLUX.1-Kontext-dev", dtype="bf16", max_area=512**2)
    cond = policy.encode_prompts(["make the cat blue"], [("/data/cat.png",)])
    v = policy.velocity(x, sigma, cond, guidance=2.5)

What FluxKontextPipeline (diffusers 0.42.1) does, reproduced here:
- output size: the requested (height, width) rescaled to `max_area` at the same aspect ratio,
  each side floored to a multiple of 2·vae_scale_factor;
- the source image: resized to the Kontext training resolution closest to its aspect ratio
  (`_auto_resize`, PREFERRED_KONTEXT_RESOLUTIONS), floored to the same multiple, normalised to
  [−1, 1] by the pipeline's own image processor, VAE-encoded (the latent distribution's mode),
  shifted and scaled as the noise latents, 2×2-packed;
- the transformer sees [noise tokens, image tokens] with position ids (0, row, col) for the noise
  and (1, row, col) for the image; its prediction is sliced back to the noise tokens;
- σ grid as FLUX.1 (linspace(1, 1/T, T), μ from the noise tokens only); guidance embedding, one
  evaluation per row (the pipeline's optional true CFG is not used).

The source image is encoded once per (prompt, images) pair: the prompt cache holds both, so a
group and the update's replayed rows reuse it (flowpo.policy.edit). Rows of one call must share a
condition size: by default the first source image fixes it, and `image_resolution` sets it.
"""
from __future__ import annotations

import torch

from flowpo.errors import ConfigError
from flowpo.policy.base import Cond
from flowpo.policy.diffusers_common import Mode, autocast
from flowpo.policy.edit import BLANK, open_source
from flowpo.policy.flux import FluxPolicy, image_ids, pack_latents, unpack_latents

# FluxKontextPipeline's PREFERRED_KONTEXT_RESOLUTIONS, (width, height): Kontext's training sizes.
KONTEXT_RESOLUTIONS = (
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688),
    (1568, 672),
)


def max_area_size(height: int, width: int, max_area: int, multiple: int) -> tuple[int, int]:
    """The pipeline's output size: (h, w) at aspect w/h with h·w ≈ max_area, floored to `multiple`."""
    aspect = width / height
    w, h = round((max_area * aspect) ** 0.5), round((max_area / aspect) ** 0.5)
    return h // multiple * multiple, w // multiple * multiple


def auto_image_size(height: int, width: int, multiple: int) -> tuple[int, int]:
    """The pipeline's `_auto_resize`: the training resolution closest to the source's aspect ratio."""
    _, w, h = min((abs(width / height - w / h), w, h) for w, h in KONTEXT_RESOLUTIONS)
    return h // multiple * multiple, w // multiple * multiple


class FluxKontextPolicy(FluxPolicy):
    """A FluxKontextPipeline's transformer as the policy; CLIP, T5 and the VAE frozen.

    Args (besides FluxPolicy's; `resolution` is the requested size that `max_area` rescales):
        max_area: output pixels, as the pipeline's `max_area` (default 1024²).
        image_resolution: the condition image's size in px (int or (height, width)); None = the
            pipeline's `_auto_resize` rule applied to the first source image.
    """

    pipeline_class_name = "FluxKontextPipeline"
    model_kind = "flux_kontext"
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
        max_sequence_length: int = 512,
        prompt_cache_size: int = 1024,
        cfg_grad: str = "conditional",
        max_area: int = 1024**2,
        image_resolution: int | tuple[int, int] | None = None,
    ):
        super().__init__(pipe, dtype=dtype, mode=mode, lora_rank=lora_rank, lora_alpha=lora_alpha,
                         lora_targets=lora_targets, resolution=resolution,
                         gradient_checkpointing=gradient_checkpointing, device=device,
                         max_sequence_length=max_sequence_length, prompt_cache_size=prompt_cache_size,
                         cfg_grad=cfg_grad)
        multiple = 2 * pipe.vae_scale_factor
        if max_area < multiple * multiple:
            raise ValueError(f"model.max_area={max_area} is below one {multiple}×{multiple} px patch")
        self.height, self.width = max_area_size(self.height, self.width, max_area, multiple)
        scale = pipe.vae_scale_factor
        self.latent_shape = (self.latent_shape[0], self.height // scale, self.width // scale)
        self._img_ids = image_ids(self.latent_shape[1], self.latent_shape[2], self.device)
        if isinstance(image_resolution, int):
            image_resolution = (image_resolution, image_resolution)
        if image_resolution is not None and any(int(s) <= 0 or int(s) % multiple for s in image_resolution):
            raise ValueError(f"model.image_resolution={image_resolution!r}: sides must be positive multiples "
                             f"of {multiple} px")
        self.image_hw: tuple[int, int] | None = tuple(int(s) for s in image_resolution) if image_resolution else None
        self._fixed_size = self.image_hw is not None

    # -- Policy interface ---------------------------------------------------------------------

    def encode_prompts(self, prompts: list[str], images: list[tuple[str, ...]] | None = None) -> Cond:
        """{"prompt_embeds", "pooled", "image_tokens": [N, S_img, 4C] packed source latents}.
        `images`: each row's source image paths (exactly one for Kontext)."""
        if images is None or len(images) != len(prompts):
            raise ValueError("flux_kontext edits images: encode_prompts(prompts, images) needs one tuple of "
                             "source image paths per prompt (flowpo.policy.edit.encode_rows)")
        if not prompts:  # the shape of a row, no rows (an empty lock-step call)
            return {k: v[:0] for k, v in self._prompts.get([("", (BLANK,))]).items()}
        for imgs in images:
            if len(imgs) != 1:
                raise ConfigError(f"model.kind='flux_kontext' takes one source image per prompt row, got {len(imgs)} "
                                  f"({list(imgs)}); give 'image' (one path)")
        return self._prompts.get([(p, tuple(imgs)) for p, imgs in zip(prompts, images)])

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, guidance: float) -> torch.Tensor:
        n, _, h, w = x.shape
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(n)  # [N]
        g = torch.full((n,), float(guidance), dtype=torch.float32, device=x.device) \
            if self.has_guidance_embedding else None
        noise = pack_latents(x)                                                      # [N, S, 4C]
        ref = cond["image_tokens"]                                                   # [N, S_img, 4C]
        embeds = cond["prompt_embeds"]
        ids = torch.cat([self._img_ids if (h, w) == self.latent_shape[1:] else image_ids(h, w, x.device),
                         self._ref_ids.to(x.device)])                                # [S + S_img, 3]
        with autocast(self.device, self.dtype):
            out = self._trainable.active(
                hidden_states=torch.cat([noise, ref.to(noise.device)], dim=1).to(self.dtype),
                timestep=sigma,
                guidance=g,
                pooled_projections=cond["pooled"].to(self.dtype),
                encoder_hidden_states=embeds.to(self.dtype),
                txt_ids=torch.zeros(embeds.shape[1], 3, dtype=torch.float32, device=x.device),
                img_ids=ids,
                return_dict=False,
            )[0]
        return unpack_latents(out[:, :noise.shape[1]].float(), h, w)

    def source_layout(self, paths: tuple[str, ...]) -> str:
        """The condition size (h × w px) the source at `paths` gets, read from its header."""
        from PIL import Image

        if len(paths) != 1:
            return f"{len(paths)} sources (Kontext takes one)"
        if self._fixed_size:
            h, w = self.image_hw
        else:
            with Image.open(paths[0]) as im:
                h, w = auto_image_size(im.height, im.width, 2 * self.pipe.vae_scale_factor)
        return f"a {h}×{w} px source"

    # -- internals ----------------------------------------------------------------------------

    def _condition_size(self, img) -> tuple[int, int]:
        """The condition size: `image_resolution`, or the pipeline's rule for the first source."""
        if self._fixed_size:
            return self.image_hw
        auto = auto_image_size(img.height, img.width, 2 * self.pipe.vae_scale_factor)
        if self.image_hw is not None and auto != self.image_hw:
            raise ConfigError(f"source images of different aspect ratios give condition sizes {auto} and "
                              f"{self.image_hw}; set model.image_resolution to one size (height, width) for all")
        self.image_hw = auto
        return auto

    @property
    def _ref_ids(self) -> torch.Tensor:
        h, w = (s // self.pipe.vae_scale_factor for s in self.image_hw)
        ids = image_ids(h, w, torch.device("cpu"))
        ids[:, 0] = 1  # the reference image's position index
        return ids

    @torch.no_grad()
    def _encode_images(self, paths: list[str]) -> torch.Tensor:
        """Source images → packed VAE latents [N, S_img, 4C], as the pipeline prepares them."""
        proc, vae = self.pipe.image_processor, self.pipe.vae
        rows = []
        for path in paths:
            img = open_source(path, None if self.image_hw is None else self.image_hw[::-1])
            h, w = self._condition_size(img)
            pixels = proc.preprocess(proc.resize(img, h, w), h, w)                # [1, 3, h, w] in [−1, 1]
            param = next(vae.parameters())
            z = vae.encode(pixels.to(param.device, param.dtype)).latent_dist.mode()
            z = (z - vae.config.shift_factor) * vae.config.scaling_factor
            rows.append(pack_latents(z.float()))
        return torch.cat(rows)

    def _encode(self, keys: list[tuple[str, tuple[str, ...]]]) -> Cond:
        text = super()._encode([p for p, _ in keys])
        return {**text, "image_tokens": self._encode_images([imgs[0] for _, imgs in keys]).to(self.device)}
