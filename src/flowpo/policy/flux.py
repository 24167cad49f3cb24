"""FLUX.1 (guidance-distilled rectified flow) behind the `Policy` interface.

    policy = FluxPolicy.from_pretrained("/models/FLUX.1-dev", dtype="bf16", resolution=720)
    v = policy.velocity(x, sigma, policy.encode_prompts(prompts), guidance=3.5)

The policy's latent is the VAE latent [N, C, H/8, W/8] (C = 16), so kernels see [N, *D] like
for any other model. The FLUX transformer reads 2×2 patches as a token sequence: `velocity`
packs x into [N, (H/16)·(W/16), 4C] tokens with positional ids (0, row, col), calls the
transformer, and unpacks its output back to [N, C, H/8, W/8].

Guidance: FLUX.1-dev is guidance-distilled; g enters through the guidance embedding, one
evaluation per row (no CFG batch). Timestep input is σ itself (the transformer multiplies by
1000 internally; the diffusers pipeline passes scheduler timesteps / 1000 = σ).
Convention: x_σ = (1−σ)·x0 + σ·ε, v = ε − x0 (REFERENCE.md).
"""
from __future__ import annotations

import torch

from flowpo.policy.base import Cond
from flowpo.policy.diffusers_common import DiffusersPolicy, Mode, autocast, image_size

# Attention q/k/v/out on both streams (double blocks; single blocks share attn.to_q/k/v), the
# double blocks' feed-forward layers on both streams, and the single blocks' MLP input.
FLUX_LORA_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    "proj_mlp",
)


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """[N, C, h, w] → [N, (h/2)·(w/2), 4C]: each 2×2 patch becomes one token (channel-major)."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # [N, h/2, w/2, C, 2, 2]
    return x.reshape(n, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of `pack_latents`: [N, (h/2)·(w/2), 4C] → [N, C, h, w]."""
    n, _, d = tokens.shape
    x = tokens.reshape(n, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # [N, C, h/2, 2, w/2, 2]
    return x.reshape(n, d // 4, h, w)


def image_ids(h: int, w: int, device: torch.device) -> torch.Tensor:
    """Rotary position ids (0, row, col) of the (h/2)·(w/2) patch tokens, [(h/2)·(w/2), 3] fp32."""
    rows = torch.arange(h // 2, device=device, dtype=torch.float32)[:, None].expand(h // 2, w // 2)
    cols = torch.arange(w // 2, device=device, dtype=torch.float32)[None, :].expand(h // 2, w // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)


class FluxPolicy(DiffusersPolicy):
    """A FluxPipeline's transformer as the policy; CLIP, T5 and the VAE frozen.

    Args:
        pipe: a `FluxPipeline` (its transformer is modified in place: LoRA injected).
        dtype: "fp32" | "bf16" | "fp16": weights of the frozen parts and the compute dtype;
            velocities are always returned in fp32.
        mode: "lora" or "full" (MixGRPO and DanceGRPO train FLUX fully, lr 1e-5).
        lora_rank, lora_alpha: LoRA r and α (scale α / r); default r 64, α 128.
        lora_targets: module-name suffixes to adapt; default `FLUX_LORA_TARGETS`.
        resolution: image side in px, or (height, width); None = the pipeline's default
            (128 · vae_scale_factor = 1024 px). Must be a multiple of 2 · vae_scale_factor.
        gradient_checkpointing: recompute transformer activations in the backward pass.
        device: where every component runs.
        max_sequence_length: T5 tokens per prompt (the pipeline's default is 512).
        prompt_cache_size: prompts whose embeddings are kept (least recently used evicted).

    `FluxPolicy.from_pretrained(path, **options)` loads a local FluxPipeline folder (never the
    hub); `options` are the keyword arguments above.
    """

    pipeline_class_name = "FluxPipeline"
    model_kind = "flux"
    default_lora_targets = FLUX_LORA_TARGETS
    frozen_components = ("text_encoder", "text_encoder_2", "vae")

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
            cfg_grad=cfg_grad,  # unused: FLUX's guidance is an embedding, one branch
        )
        self.has_guidance_embedding = bool(pipe.transformer.config.guidance_embeds)
        scale = pipe.vae_scale_factor
        self.height, self.width = image_size(pipe, resolution, 2 * scale)
        self.latent_shape = (pipe.transformer.config.in_channels // 4, self.height // scale, self.width // scale)
        self._img_ids = image_ids(self.latent_shape[1], self.latent_shape[2], self.device)  # [S, 3]

    # -- Policy interface (module, decode and the trainable state: DiffusersPolicy) -----------

    def encode_prompts(self, prompts: list[str]) -> Cond:
        """{"prompt_embeds": [N, L, D] T5 tokens, "pooled": [N, P] CLIP pooled output}."""
        return self._prompts.get(prompts)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, guidance: float) -> torch.Tensor:
        n, _, h, w = x.shape
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(n)  # [N]
        if self.has_guidance_embedding:
            g = torch.full((n,), float(guidance), dtype=torch.float32, device=x.device)  # [N]
        elif guidance != 1.0:
            raise ValueError(
                f"guidance={guidance}: this FLUX transformer has no guidance embedding "
                "(config.guidance_embeds=False, e.g. FLUX.1-schnell); set the sampling guidance to 1.0"
            )
        else:
            g = None
        embeds = cond["prompt_embeds"]
        txt_ids = torch.zeros(embeds.shape[1], 3, dtype=torch.float32, device=x.device)  # [L, 3]
        with autocast(self.device, self.dtype):
            out = self._trainable.active(
                hidden_states=pack_latents(x).to(self.dtype),  # [N, S, 4C]
                timestep=sigma,  # the transformer scales σ by 1000 itself
                guidance=g,
                pooled_projections=cond["pooled"].to(self.dtype),
                encoder_hidden_states=embeds.to(self.dtype),
                txt_ids=txt_ids,
                img_ids=self._img_ids if (h, w) == self.latent_shape[1:] else image_ids(h, w, x.device),
                return_dict=False,
            )[0]
        return unpack_latents(out.float(), h, w)

    def _timestep_kwargs(self, T: int) -> dict:
        """As FluxPipeline: sigmas linspace(1, 1/T, T) (unless the scheduler makes its own flow
        sigmas) and the dynamic-shift μ of the packed latent's token count (2×2 patches)."""
        import numpy as np

        kw: dict = {"mu": self._mu(self._image_seq_len(), default_max_shift=1.15)}
        if not self.pipe.scheduler.config.get("use_flow_sigmas", False):
            kw["sigmas"] = np.linspace(1.0, 1.0 / T, T)
        return kw

    def _image_seq_len(self) -> int:
        return (self.latent_shape[1] // 2) * (self.latent_shape[2] // 2)

    def evals_per_row(self, guidance: float) -> int:
        """One evaluation per row: guidance enters through the guidance embedding, not CFG."""
        return 1

    # -- internals --------------------------------------------------------------------------

    def _encode(self, prompts: list[str]) -> Cond:
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length
        )
        return {"prompt_embeds": embeds, "pooled": pooled}
