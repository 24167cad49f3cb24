"""Qwen-Image (MMDiT with a Qwen2.5-VL text encoder) behind the `Policy` interface, with true CFG.

    policy = QwenImagePolicy.from_pretrained("/models/Qwen-Image", dtype="bf16", resolution=1024)
    v = policy.velocity(x, sigma, policy.encode_prompts(prompts), guidance=4.0)

Source: diffusers `QwenImagePipeline` (0.42; `QwenImageTransformer2DModel`, `AutoencoderKLQwenImage`)
and the Qwen-Image technical report (Wu et al. 2025, arXiv 2508.02324). What the pipeline does is
reproduced here; nothing is copied from it.

Latent and packing. The policy's latent is the VAE latent of one frame, x ∈ [N, C, h, w] with
C = in_channels / 4 (16), h = H/8, w = W/8 (the VAE is a causal video VAE: it sees
[N, C, 1, h, w]). The transformer reads 2×2 patches as tokens, channel-major within a token:

    tokens[n, i·(w/2) + j, c·4 + 2a + b] = x[n, c, 2i + a, 2j + b]     → [N, (h/2)·(w/2), 4C]

with `img_shapes = [(1, h/2, w/2)]` per row for the transformer's 3-axis RoPE (frame, row, col);
its output tokens are unpacked the same way.

Text. The prompt p is wrapped in the pipeline's chat template (a system line asking to describe
colour, shape, size, texture, quantity, text and layout, then `user: p`); the last hidden state of
Qwen2.5-VL is taken, the template's first 34 tokens are dropped, and at most
`max_sequence_length` tokens (512 in the pipeline) are kept. Prompts have different lengths, so a
row is padded with zeros to `max_sequence_length` and carries `prompt_mask` (1 = token): the
transformer masks padded keys (`encoder_hidden_states_mask`), and `velocity` trims the batch to its
longest prompt, so the computation is the pipeline's own (which pads to the longest prompt of its
batch, and passes no mask when no row is padded).

Timestep. The pipeline hands the transformer `timestep / 1000` = σ (the transformer multiplies by
1000 inside its sinusoidal embedding). Convention: x_σ = (1−σ)·x0 + σ·ε, v = ε − x0 (REFERENCE.md).

True CFG, as `QwenImagePipeline.__call__` with `true_cfg_scale = g` and a negative prompt
(default " ", the model card's): with v_c, v_u the conditional and negative-prompt velocities as
packed tokens, per token t (the norm is over the 4C values of the token: C channels × 2×2 pixels),

    v̂ = v_u + g·(v_c − v_u),        v = v̂ · ‖v_c‖_t / ‖v̂‖_t        (norm rescaling)

One batch of 2N rows per call (`evals_per_row` = 2). At g = 1, v = v_c with one row. The pipeline
applies CFG only for g > 1; the policy applies the formula for every g ≠ 1 (as SD3Policy).
`cfg_norm_rescale=False` gives plain CFG v̂. With `cfg_grad="conditional"`, v_u is detached (the
rescaling factor still carries the gradient of v_c).

Schedule, as the pipeline: sigmas linspace(1, 1/T, T) handed to the FlowMatchEuler scheduler with
the dynamic-shift μ of the packed token count S = (h/2)·(w/2),

    μ = base_shift + (max_shift − base_shift)·(S − base_seq_len)/(max_seq_len − base_seq_len),
    σ ↦ e^μ / (e^μ + 1/σ − 1)   (time_shift_type "exponential"),

then the scheduler's `shift_terminal` stretch (Qwen-Image: the last nonzero σ is 0.02) and a
final 0. Qwen-Image's scheduler config: base_seq_len 256, max_seq_len 8192, base_shift 0.5,
max_shift 0.9 (the pipeline's fallbacks are 256 / 4096 / 0.5 / 1.15).
"""
from __future__ import annotations

import numpy as np
import torch

from flowpo.policy.base import Cond
from flowpo.policy.diffusers_common import DiffusersPolicy, Mode, autocast, image_size

# Joint attention q/k/v/out on the image and the text stream, and both streams' MLPs.
QWEN_IMAGE_LORA_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2",
)


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """[N, C, h, w] → [N, (h/2)·(w/2), 4C]: each 2×2 patch one token (channel-major)."""
    n, c, h, w = x.shape
    patches = x.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # [N, h/2, w/2, C, 2, 2]
    return patches.reshape(n, (h // 2) * (w // 2), 4 * c)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of `pack_latents`: [N, (h/2)·(w/2), 4C] → [N, C, h, w]."""
    n, _, d = tokens.shape
    patches = tokens.reshape(n, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # [N, C, h/2, 2, w/2, 2]
    return patches.reshape(n, d // 4, h, w)


def rescaled_cfg(v_u: torch.Tensor, v_c: torch.Tensor, guidance: float, rescale: bool = True) -> torch.Tensor:
    """v̂ = v_u + g·(v_c − v_u), then (rescale) v̂·‖v_c‖/‖v̂‖ with norms over the last dim (a packed
    token's channels). [N, S, D] → [N, S, D]."""
    combined = v_u + guidance * (v_c - v_u)
    if not rescale:
        return combined
    ratio = v_c.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return combined * ratio


class QwenImagePolicy(DiffusersPolicy):
    """A QwenImagePipeline's transformer as the policy; the Qwen2.5-VL text encoder and VAE frozen.

    Args:
        pipe: a `QwenImagePipeline` (its transformer is modified in place: LoRA injected).
        dtype: "fp32" | "bf16" | "fp16": weights of the frozen parts and the compute dtype;
            velocities are always returned in fp32.
        mode: "lora" or "full".
        lora_rank, lora_alpha: LoRA r and α (scale α / r); default r 64, α 128.
        lora_targets: module-name suffixes to adapt; default `QWEN_IMAGE_LORA_TARGETS`.
        resolution: image side in px, or (height, width); None = the pipeline's default
            (128 · vae_scale_factor = 1024 px). Must be a multiple of 2 · vae_scale_factor (16).
        gradient_checkpointing: recompute transformer activations in the backward pass.
        device: where every component runs.
        max_sequence_length: text tokens kept per prompt after the template (the pipeline's
            default 512; at most 1024). Every cached row is padded to this length.
        prompt_cache_size: prompts whose embeddings are kept (least recently used evicted).
        cfg_grad: "conditional" (no gradient through the negative-prompt branch) or "both".
        negative_prompt: the unconditional prompt of true CFG (" ", as the Qwen-Image card).
        cfg_norm_rescale: rescale the CFG velocity per token to the conditional one's norm, as
            the pipeline does (default True).

    `QwenImagePolicy.from_pretrained(path, **options)` loads a local QwenImagePipeline folder
    (never the hub); `options` are the keyword arguments above.
    """

    pipeline_class_name = "QwenImagePipeline"
    model_kind = "qwen_image"
    default_lora_targets = QWEN_IMAGE_LORA_TARGETS
    frozen_components = ("text_encoder", "vae")

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
        negative_prompt: str = " ",
        cfg_norm_rescale: bool = True,
    ):
        if not 0 < max_sequence_length <= 1024:
            raise ValueError(f"model.max_sequence_length={max_sequence_length}: QwenImagePipeline keeps "
                             "1 to 1024 text tokens (its default is 512)")
        if pipe.transformer.config.get("guidance_embeds", False):
            raise ValueError("this Qwen-Image transformer has guidance_embeds=True (a guidance-distilled "
                             "variant), which the policy does not support; use a QwenImagePipeline folder "
                             "of the base model (true CFG)")
        super().__init__(
            pipe,
            dtype=dtype,
            mode=mode,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            lora_targets=lora_targets,
            gradient_checkpointing=gradient_checkpointing,
            device=device,
            max_sequence_length=max_sequence_length,
            prompt_cache_size=prompt_cache_size,
            cfg_grad=cfg_grad,
        )
        self.negative_prompt = negative_prompt
        self.cfg_norm_rescale = bool(cfg_norm_rescale)
        scale = pipe.vae_scale_factor
        self.height, self.width = image_size(pipe, resolution, 2 * scale)
        self.latent_shape = (pipe.transformer.config.in_channels // 4, self.height // scale, self.width // scale)

    # -- Policy interface (module, evals_per_row and the trainable state: DiffusersPolicy) -----

    def encode_prompts(self, prompts: list[str]) -> Cond:
        """{"prompt_embeds": [N, L, D] Qwen2.5-VL last hidden states (template dropped, zero-padded
        to L = max_sequence_length), "prompt_mask": [N, L] int64, 1 on the prompt's tokens}."""
        return self._prompts.get(prompts)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, guidance: float) -> torch.Tensor:
        n, _, h, w = x.shape
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(n)  # [N]
        tokens = pack_latents(x)  # [N, S, 4C]
        embeds, mask = cond["prompt_embeds"], cond["prompt_mask"]
        if guidance == 1.0:
            return unpack_latents(self._transformer(tokens, sigma, embeds, mask, h, w).float(), h, w)
        neg = self._negative_cond()
        embeds = torch.cat([neg["prompt_embeds"].to(embeds.device).expand(n, -1, -1), embeds])  # [2N, L, D]
        mask = torch.cat([neg["prompt_mask"].to(mask.device).expand(n, -1), mask])  # [2N, L]
        out = self._transformer(torch.cat([tokens, tokens]), torch.cat([sigma, sigma]), embeds, mask, h, w)
        v_u, v_c = out.float().chunk(2)  # [N, S, 4C] each
        if self.cfg_grad == "conditional":
            v_u = v_u.detach()
        return unpack_latents(rescaled_cfg(v_u, v_c, guidance, self.cfg_norm_rescale), h, w)

    def guide(self, v_u: torch.Tensor, v_c: torch.Tensor, guidance: float) -> torch.Tensor:
        """The guided velocity from the branches' latents [N, C, h, w]: the renormalised CFG on
        packed tokens, as `velocity` applies it."""
        h, w = v_u.shape[-2:]
        if self.cfg_grad == "conditional":
            v_u = v_u.detach()
        return unpack_latents(rescaled_cfg(pack_latents(v_u), pack_latents(v_c), guidance, self.cfg_norm_rescale), h, w)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents [N, C, h, w] → images [N, 3, H, W] fp32 in [0, 1]. The VAE decodes one frame of
        z = x·std + mean per channel (the pipeline's latents / (1/std) + mean)."""
        vae = self.pipe.vae
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32, device=x.device).view(shape)
        std = torch.tensor(vae.config.latents_std, dtype=torch.float32, device=x.device).view(shape)
        param = next(vae.parameters())
        z = x.float()[:, :, None] * std + mean  # [N, C, 1, h, w]
        with torch.no_grad():
            images = vae.decode(z.to(param.device, param.dtype), return_dict=False)[0][:, :, 0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    # -- internals --------------------------------------------------------------------------

    def _timestep_kwargs(self, T: int) -> dict:
        """As QwenImagePipeline: sigmas linspace(1, 1/T, T) (unless the scheduler makes its own
        flow sigmas) and μ of the packed token count, pipeline fallback max_shift 1.15."""
        kw: dict = {"mu": self._mu(self._image_seq_len(), default_max_shift=1.15)}
        if not self.pipe.scheduler.config.get("use_flow_sigmas", False):
            kw["sigmas"] = np.linspace(1.0, 1.0 / T, T)
        return kw

    def _image_seq_len(self) -> int:
        return (self.latent_shape[1] // 2) * (self.latent_shape[2] // 2)

    def _encode(self, prompts: list[str]) -> Cond:
        embeds, mask = self.pipe.encode_prompt(
            prompt=prompts, device=self.device, max_sequence_length=self.max_sequence_length
        )  # [N, L_batch, D]; mask None when no row is padded
        n, length, dim = embeds.shape
        if mask is None:
            mask = torch.ones(n, length, dtype=torch.long, device=embeds.device)
        pad = self.max_sequence_length - length
        embeds = torch.cat([embeds, embeds.new_zeros(n, pad, dim)], dim=1)  # [N, max_sequence_length, D]
        mask = torch.cat([mask.long(), mask.new_zeros(n, pad, dtype=torch.long)], dim=1)
        return {"prompt_embeds": embeds, "prompt_mask": mask}

    def _transformer(self, tokens, sigma, embeds, mask, h: int, w: int) -> torch.Tensor:
        """The transformer on packed tokens [M, S, 4C], text trimmed to the batch's longest prompt
        (mask None when no row is padded, as the pipeline); returns packed tokens [M, S, 4C]."""
        mask = mask.bool()
        length = max(1, int(mask.sum(dim=1).max()))  # ≥ 1: a lock-step dummy row has no text
        embeds, mask = embeds[:, :length], mask[:, :length]
        with autocast(self.device, self.dtype):
            return self._trainable.active(
                hidden_states=tokens.to(self.dtype),
                timestep=sigma,  # the pipeline's timestep / 1000; ×1000 inside the transformer
                encoder_hidden_states=embeds.to(self.dtype),
                encoder_hidden_states_mask=None if bool(mask.all()) else mask,
                img_shapes=[[(1, h // 2, w // 2)]] * tokens.shape[0],
                return_dict=False,
            )[0]
