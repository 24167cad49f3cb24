"""Stable Diffusion 3 / 3.5 (MMDiT) behind the `Policy` interface, with true classifier-free guidance.

    policy = SD3Policy.from_pretrained("/models/stable-diffusion-3.5-medium", dtype="bf16")
    cond = policy.encode_prompts(["a photo of a cat"] * 4)
    v = policy.velocity(x, sigma, cond, guidance=4.5)     # [4, 16, 64, 64] fp32 at 512 px

Velocity convention (REFERENCE.md): x_σ = (1−σ)·x0 + σ·ε, v = ε − x0, which is what the SD3
transformer predicts; its timestep input is σ·1000 (the FlowMatchEuler scheduler's timesteps).
With guidance g ≠ 1 the conditional and unconditional (empty prompt) rows go through the
transformer in one batch of 2N rows: v = v_u + g·(v_c − v_u).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from flowpo.policy.base import Cond
from flowpo.policy.diffusers_common import (
    Mode,
    PromptCache,
    TrainableTransformer,
    autocast,
    image_size,
    load_pipeline,
    place_frozen,
    resolve_dtype,
    vae_decode,
)

# Flow-GRPO's SD3 LoRA targets: joint attention q/k/v/out on the image and the context stream.
SD3_LORA_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
)
_FROZEN = ("text_encoder", "text_encoder_2", "text_encoder_3", "vae")


class SD3Policy:
    """A StableDiffusion3Pipeline's transformer as the policy; text encoders and VAE frozen.

    Args:
        pipe: a `StableDiffusion3Pipeline` (its transformer is modified in place: LoRA injected).
        dtype: "fp32" | "bf16" | "fp16": weights of the frozen parts and the compute dtype
            (autocast); velocities are always returned in fp32.
        mode: "lora" (train a LoRA; reference = adapters off) or "full" (train all transformer
            weights in fp32; reference = a frozen copy).
        lora_rank, lora_alpha: LoRA r and α (scale α / r); Flow-GRPO uses r 32, α 64.
        lora_targets: module-name suffixes to adapt; default `SD3_LORA_TARGETS`.
        resolution: image side in px, or (height, width); None = the pipeline's default
            (transformer sample_size · vae_scale_factor, 1024 px for SD3.5-M).
        gradient_checkpointing: recompute transformer activations in the backward pass.
        device: where every component runs.
        max_sequence_length: T5 tokens per prompt (the pipeline's default is 256).
        prompt_cache_size: prompts whose embeddings are kept (least recently used evicted).
    """

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
        gradient_checkpointing: bool = False,
        device: str | torch.device = "cpu",
        max_sequence_length: int = 256,
        prompt_cache_size: int = 1024,
    ):
        self.pipe = pipe
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype)
        self.max_sequence_length = max_sequence_length
        place_frozen(pipe, _FROZEN, self.device, self.dtype)
        pipe.transformer.to(self.device)
        self._trainable = TrainableTransformer(
            pipe.transformer,
            mode=mode,
            dtype=self.dtype,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            lora_targets=list(lora_targets or SD3_LORA_TARGETS),
            gradient_checkpointing=gradient_checkpointing,
        )
        scale = pipe.vae_scale_factor
        self.height, self.width = image_size(pipe, resolution, scale * pipe.transformer.config.patch_size)
        self.latent_shape = (pipe.transformer.config.in_channels, self.height // scale, self.width // scale)
        self._prompts = PromptCache(self._encode, prompt_cache_size)
        self._negative: Cond | None = None

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: str | torch.dtype = "fp32",
        mode: Mode = "lora",
        lora_rank: int = 32,
        lora_alpha: float = 64,
        lora_targets: list[str] | None = None,
        resolution: int | tuple[int, int] | None = None,
        gradient_checkpointing: bool = False,
        device: str | torch.device = "cpu",
        max_sequence_length: int = 256,
        prompt_cache_size: int = 1024,
    ) -> "SD3Policy":
        """Load a local StableDiffusion3Pipeline folder (never the hub) and wrap it."""
        pipe = load_pipeline("StableDiffusion3Pipeline", path, "sd3", resolve_dtype(dtype))
        return cls(
            pipe,
            dtype=dtype,
            mode=mode,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            lora_targets=lora_targets,
            resolution=resolution,
            gradient_checkpointing=gradient_checkpointing,
            device=device,
            max_sequence_length=max_sequence_length,
            prompt_cache_size=prompt_cache_size,
        )

    # -- Policy interface -------------------------------------------------------------------

    @property
    def module(self) -> nn.Module:
        return self._trainable.module

    @module.setter
    def module(self, wrapped: nn.Module) -> None:  # a DDP/FSDP wrapper of the transformer
        self._trainable.module = wrapped

    def encode_prompts(self, prompts: list[str]) -> Cond:
        """{"prompt_embeds": [N, L, D] (CLIP-L ‖ CLIP-G, then T5 tokens), "pooled": [N, P]}."""
        return self._prompts.get(prompts)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, guidance: float) -> torch.Tensor:
        n = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(n)  # [N]
        embeds, pooled = cond["prompt_embeds"], cond["pooled"]
        if guidance == 1.0:
            return self._transformer(x, sigma, embeds, pooled).float()
        neg = self._negative_cond()
        embeds = torch.cat([neg["prompt_embeds"].expand(n, -1, -1), embeds])  # [2N, L, D]
        pooled = torch.cat([neg["pooled"].expand(n, -1), pooled])  # [2N, P]
        v_u, v_c = self._transformer(torch.cat([x, x]), torch.cat([sigma, sigma]), embeds, pooled).float().chunk(2)
        return v_u + guidance * (v_c - v_u)

    def evals_per_row(self, guidance: float) -> int:
        return 1 if guidance == 1.0 else 2

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents [N, C, H/8, W/8] → images [N, 3, H, W] fp32 in [0, 1]."""
        return vae_decode(self.pipe.vae, x)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self._trainable.parameters()

    def disable_adapter(self) -> contextlib.AbstractContextManager:
        return self._trainable.disable_adapter()

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return self._trainable.state_dict()

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._trainable.load_state_dict(state)

    def save_pretrained(self, directory: str) -> None:
        """LoRA: `StableDiffusion3Pipeline.load_lora_weights(directory)` loads it back (α kept).
        Full: `directory/transformer` in diffusers format."""
        self._trainable.save(directory, type(self.pipe))

    # -- internals --------------------------------------------------------------------------

    def _encode(self, prompts: list[str]) -> Cond:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return {"prompt_embeds": embeds, "pooled": pooled}

    def _negative_cond(self) -> Cond:
        """The empty prompt's embeddings, [1, L, D] and [1, P], encoded once."""
        if self._negative is None:
            with torch.no_grad():
                self._negative = self._encode([""])
        return self._negative

    def _transformer(self, x, sigma, embeds, pooled) -> torch.Tensor:
        with autocast(self.device, self.dtype):
            return self._trainable.active(
                hidden_states=x.to(self.dtype),
                timestep=sigma * 1000.0,  # the scheduler's timesteps are σ·1000
                encoder_hidden_states=embeds.to(self.dtype),
                pooled_projections=pooled.to(self.dtype),
                return_dict=False,
            )[0]
