"""Wan2.1 text-to-video (WanTransformer3DModel) behind the `Policy` interface, with true CFG.

    policy = WanPolicy.from_pretrained("/models/Wan2.1-T2V-1.3B-Diffusers", dtype="bf16",
                                       resolution=(480, 832), num_frames=33)
    v = policy.velocity(x, sigma, policy.encode_prompts(prompts), guidance=5.0)   # x [N, 16, 9, 60, 104]

Latents are 5-D per batch: D = (C, F, H/8, W/8) with F = (num_frames − 1)/4 + 1 latent frames;
the step kernels work on any [N, *D]. The transformer predicts v = ε − x0 for
x_σ = (1−σ)·x0 + σ·ε and reads the timestep σ·1000 (its pipeline passes scheduler timesteps).
With g ≠ 1 the prompt and the negative prompt run in one batch of 2N rows: v = v_u + g·(v_c − v_u).

`decode` returns videos [N, 3, F_px, H, W] in [0, 1]: the image contract's [N, 3, H, W] with a
frame axis inserted; rewards must accept that axis (e.g. score frames and average).
Wan2.2's two-expert pipelines (transformer_2 with boundary_ratio) are `Wan22Policy`'s
(model.kind='wan22', policy/wan22.py).
"""
from __future__ import annotations

import torch

from flowpo.policy.base import Cond
from flowpo.policy.diffusers_common import DiffusersPolicy, Mode, autocast

# Self-attention (attn1) and cross-attention (attn2) projections and the feed-forward network.
WAN_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")
DEFAULT_SIZE = (480, 832)  # WanPipeline.__call__'s height and width defaults


class WanPolicy(DiffusersPolicy):
    """A WanPipeline's transformer as the policy; UMT5 and the video VAE frozen.

    Args:
        pipe: a `WanPipeline` (Wan2.1: one transformer; its transformer gets the LoRA in place).
        dtype, mode, lora_rank, lora_alpha, lora_targets, gradient_checkpointing, device,
        prompt_cache_size: as for `SD3Policy`.
        resolution: frame side in px, or (height, width); None = the pipeline's 480×832.
        num_frames: video length in frames; (num_frames − 1) must be divisible by 4 (default 81).
        max_sequence_length: UMT5 tokens per prompt (the pipeline's default is 512).
        negative_prompt: the unconditional prompt of CFG (the pipeline's default is "").

    `WanPolicy.from_pretrained(path, **options)` loads a local WanPipeline folder (never the hub);
    `options` are the keyword arguments above.
    """

    pipeline_class_name = "WanPipeline"
    model_kind = "wan"
    default_lora_targets = WAN_LORA_TARGETS
    frozen_components = ("text_encoder", "vae")
    config_fields = ("num_frames",)

    def __init__(
        self,
        pipe,
        *,
        dtype: str | torch.dtype = "fp32",
        mode: Mode = "lora",
        lora_rank: int = 32,
        lora_alpha: float = 64,
        lora_targets: list[str] | None = None,
        resolution: int | tuple[int, int] | None = None,
        num_frames: int = 81,
        gradient_checkpointing: bool = False,
        device: str | torch.device = "cpu",
        max_sequence_length: int = 512,
        negative_prompt: str = "",
        prompt_cache_size: int = 1024,
        cfg_grad: str = "conditional",
    ):
        if getattr(pipe, "transformer_2", None) is not None or pipe.transformer is None:
            raise ValueError(
                "WanPolicy supports single-transformer Wan2.1 pipelines; this folder is a two-expert "
                "Wan2.2 pipeline (transformer_2: use model.kind='wan22') or has no transformer"
            )
        if getattr(pipe.config, "expand_timesteps", False):
            raise ValueError("WanPolicy does not support expand_timesteps pipelines (Wan2.2 TI2V)")
        self.negative_prompt = negative_prompt
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
        self._set_video_shape(pipe, DEFAULT_SIZE if resolution is None else resolution, num_frames)

    def _set_video_shape(self, pipe, resolution: int | tuple[int, int], num_frames: int) -> None:
        """Check the frame size and length; set height, width, num_frames and latent_shape."""
        s, t = pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal
        _, p_h, p_w = pipe.transformer.config.patch_size
        height, width = (resolution, resolution) if isinstance(resolution, int) else map(int, resolution)
        if height % (s * p_h) or width % (s * p_w) or height <= 0 or width <= 0:
            raise ValueError(
                f"model.resolution={resolution!r}: height and width must be positive multiples of {s * p_h}"
            )
        if num_frames < 1 or (num_frames - 1) % t:
            raise ValueError(f"num_frames={num_frames}: num_frames − 1 must be a multiple of {t} (e.g. 33, 81)")
        self.height, self.width, self.num_frames = height, width, num_frames
        channels = pipe.transformer.config.in_channels
        self.latent_shape = (channels, (num_frames - 1) // t + 1, height // s, width // s)

    # -- Policy interface (module, evals_per_row and the trainable state: DiffusersPolicy) ----

    def _timestep_kwargs(self, T: int) -> dict:
        """WanPipeline calls set_timesteps(T) with nothing else (no dynamic-shift μ)."""
        return {}

    def _image_seq_len(self) -> int:
        _, p_f, p_h, p_w = (1, *self.pipe.transformer.config.patch_size)
        c, f, h, w = self.latent_shape
        return (f // p_f) * (h // p_h) * (w // p_w)

    def encode_prompts(self, prompts: list[str]) -> Cond:
        """{"prompt_embeds": [N, L, D]} UMT5 token embeddings (padding positions zeroed)."""
        return self._prompts.get(prompts)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, guidance: float) -> torch.Tensor:
        n = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(n)  # [N]
        embeds = cond["prompt_embeds"]
        if guidance == 1.0:
            return self._transformer(x, sigma, embeds).float()
        neg = self._negative_cond()["prompt_embeds"].expand(n, -1, -1)
        out = self._transformer(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([neg, embeds]))  # [2N, *D]
        v_u, v_c = out.float().chunk(2)
        return self._guided(v_u, v_c, guidance)

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents [N, C, F, h, w] → videos [N, 3, num_frames, H, W] fp32 in [0, 1].

        The VAE expects z = x·std + mean per channel (the pipeline's latents / (1/std) + mean).
        """
        vae = self.pipe.vae
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32, device=x.device).view(shape)
        std = torch.tensor(vae.config.latents_std, dtype=torch.float32, device=x.device).view(shape)
        param = next(vae.parameters())
        video = vae.decode((x.float() * std + mean).to(param.device, param.dtype), return_dict=False)[0]
        return (video.float() / 2 + 0.5).clamp(0, 1)

    # -- internals --------------------------------------------------------------------------

    def _encode(self, prompts: list[str]) -> Cond:
        embeds, _ = self.pipe.encode_prompt(
            prompt=prompts,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
            device=self.device,
        )
        return {"prompt_embeds": embeds}

    def _transformer(self, x, sigma, embeds) -> torch.Tensor:
        with autocast(self.device, self.dtype):
            return self._trainable.active(
                hidden_states=x.to(self.dtype),
                timestep=sigma * 1000.0,
                encoder_hidden_states=embeds.to(self.dtype),
                return_dict=False,
            )[0]
