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

import torch

from flowpo.policy.base import Cond
from flowpo.policy.diffusers_common import DiffusersPolicy, Mode, autocast, image_size

# Flow-GRPO's SD3 LoRA targets: joint attention q/k/v/out on the image and the context stream.
SD3_LORA_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
)


class SD3Policy(DiffusersPolicy):
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
        cfg_grad: "conditional" (no gradient through the unconditional branch, as Flow-GRPO's
            training) or "both".

    `SD3Policy.from_pretrained(path, **options)` loads a local StableDiffusion3Pipeline folder
    (never the hub); `options` are the keyword arguments above.
    """

    pipeline_class_name = "StableDiffusion3Pipeline"
    model_kind = "sd3"
    default_lora_targets = SD3_LORA_TARGETS
    frozen_components = ("text_encoder", "text_encoder_2", "text_encoder_3", "vae")

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
        cfg_grad: str = "conditional",
    ):
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
        scale = pipe.vae_scale_factor
        self.height, self.width = image_size(pipe, resolution, scale * pipe.transformer.config.patch_size)
        self.latent_shape = (pipe.transformer.config.in_channels, self.height // scale, self.width // scale)

    # -- Policy interface (module, decode, evals_per_row and the trainable state: DiffusersPolicy)

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
        return self._guided(v_u, v_c, guidance)

    # -- internals --------------------------------------------------------------------------

    def _image_seq_len(self) -> int:
        p = self.pipe.transformer.config.patch_size
        return (self.latent_shape[1] // p) * (self.latent_shape[2] // p)

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

    def _transformer(self, x, sigma, embeds, pooled) -> torch.Tensor:
        with autocast(self.device, self.dtype):
            return self._trainable.active(
                hidden_states=x.to(self.dtype),
                timestep=sigma * 1000.0,  # the scheduler's timesteps are σ·1000
                encoder_hidden_states=embeds.to(self.dtype),
                pooled_projections=pooled.to(self.dtype),
                return_dict=False,
            )[0]
