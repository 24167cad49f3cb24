"""Z-Image (single-stream DiT with a Qwen3 text encoder) behind the `Policy` interface, with true CFG.

    policy = ZImagePolicy.from_pretrained("/models/Z-Image", dtype="bf16", resolution=1024)
    v = policy.velocity(x, sigma, policy.encode_prompts(prompts), guidance=5.0)

Source: diffusers `ZImagePipeline` (0.42; `ZImageTransformer2DModel`) and the Z-Image report
(Z-Image Team 2025, arXiv 2511.22699). What the pipeline does is reproduced here; nothing is copied.

Latent: the VAE latent x ∈ [N, C, H/8, W/8] (C = 16); the transformer takes a list of per-sample
[C, 1, h, w] tensors (frame axis 1) and patchifies them itself (2×2).

Time and sign. The transformer is trained on the reversed time τ = 1 − σ and predicts ε's opposite:
the pipeline hands it τ = (1000 − t)/1000 with t = 1000·σ, and steps its Euler scheduler with the
negated output. So, in flowpo's convention x_σ = (1−σ)·x0 + σ·ε, v = ε − x0:

    v(x, σ | c) = −f_θ(x, 1 − σ, c).

Guidance. The pipeline's CFG with its `guidance_scale` g_z on the raw outputs f_c, f_u is
f = f_c + g_z·(f_c − f_u) = f_u + (1 + g_z)·(f_c − f_u); in velocities v = v_u + g·(v_c − v_u) with
**g = 1 + g_z** (flowpo's convention, as every policy: g = 1 is no CFG). So the pipeline's
guidance_scale=4 is `sample.guidance=5`, and Z-Image-Turbo's guidance_scale=0 is guidance 1.
The negative prompt is "" (the pipeline's default). Options, as the pipeline's:
- `cfg_truncation` c ≤ 1: rows with 1 − σ > c use v_c alone (guidance dropped late in sampling);
  1.0 (default) never truncates. The policy decides per row from each row's σ.
- `cfg_normalization` k > 0: the guided output's norm (over the whole sample) is capped at
  k·‖f_c‖; 0 (default) = off.
`evals_per_row` counts 2 at g ≠ 1 even where truncation drops the unconditional branch (one
batch of 2N rows is always run; the overcount is in `nfe` only). Split CFG (`model.cfg_uncond`
recompute / reuse, flowpo.guided) uses `guide`, which has no σ: with cfg_truncation < 1 the policy
opts out of it (its `negative` is None) and every call is the joint one.

Text. Each prompt is wrapped in the tokenizer's chat template (user turn, generation prompt,
`enable_thinking=True`), padded to `max_sequence_length`, and the Qwen3 encoder's second-to-last
hidden state is kept at the real tokens only (padding removed: rows have different lengths). A
cached row is zero-padded to `max_sequence_length` with a `prompt_mask`; `velocity` hands the
transformer each row's unpadded tokens, as the pipeline does.

Schedule: sigmas linspace(1, 1/T, T) to the FlowMatchEuler scheduler with the config's static shift
(Z-Image: 3.0; μ is computed and passed as the pipeline does, and ignored unless the scheduler
config shifts dynamically).
"""
from __future__ import annotations

import numpy as np
import torch

from flowpo.policy.base import Cond
from flowpo.policy.diffusers_common import DiffusersPolicy, Mode, autocast, image_size, option_number, vae_decode

# Attention q/k/v/out and the SwiGLU feed-forward of every block (main, noise and context refiners).
ZIMAGE_LORA_TARGETS = (
    "attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
    "feed_forward.w1", "feed_forward.w2", "feed_forward.w3",
)
DEFAULT_SIDE = 1024  # ZImagePipeline.__call__'s height/width default


class ZImagePolicy(DiffusersPolicy):
    """A ZImagePipeline's transformer as the policy; the Qwen3 encoder and VAE frozen.

    Args:
        pipe: a `ZImagePipeline` (its transformer is modified in place: LoRA injected).
        dtype, mode, lora_rank, lora_alpha, gradient_checkpointing, device, prompt_cache_size,
            cfg_grad: as for `QwenImagePolicy`.
        lora_targets: module-name suffixes to adapt; default `ZIMAGE_LORA_TARGETS`.
        resolution: image side in px, or (height, width); None = 1024 (the pipeline's default).
            A multiple of 2 · vae_scale_factor (16).
        max_sequence_length: text tokens per prompt including the template (pipeline default 512).
        negative_prompt: the unconditional prompt ("" as the pipeline).
        cfg_truncation: see the module docstring (1.0 = off, the pipeline's default).
        cfg_normalization: see the module docstring (0 = off, the pipeline's default False).
    """

    pipeline_class_name = "ZImagePipeline"
    model_kind = "zimage"
    default_lora_targets = ZIMAGE_LORA_TARGETS
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
        negative_prompt: str = "",
        cfg_truncation: float = 1.0,
        cfg_normalization: float = 0.0,
    ):
        cfg_truncation = option_number("cfg_truncation", cfg_truncation)
        cfg_normalization = option_number("cfg_normalization", cfg_normalization)
        if not cfg_truncation <= 1.0:
            raise ValueError(f"model.options.cfg_truncation={cfg_truncation}: must be at most 1 (1 = never truncate)")
        if cfg_normalization < 0:
            raise ValueError(f"model.options.cfg_normalization={cfg_normalization}: must be ≥ 0 (0 = off)")
        super().__init__(
            pipe, dtype=dtype, mode=mode, lora_rank=lora_rank, lora_alpha=lora_alpha, lora_targets=lora_targets,
            gradient_checkpointing=gradient_checkpointing, device=device, max_sequence_length=max_sequence_length,
            prompt_cache_size=prompt_cache_size, cfg_grad=cfg_grad,
        )
        self.negative_prompt = negative_prompt
        self.cfg_truncation = float(cfg_truncation)
        self.cfg_normalization = float(cfg_normalization)
        if self.cfg_truncation < 1.0:
            self.negative = None  # truncation depends on σ, which `guide` is not given: no split CFG (flowpo.guided)
        scale = pipe.vae_scale_factor
        self.height, self.width = image_size(pipe, resolution or DEFAULT_SIDE, 2 * scale)
        self.latent_shape = (pipe.transformer.config.in_channels, self.height // scale, self.width // scale)

    # -- Policy interface ---------------------------------------------------------------------

    def encode_prompts(self, prompts: list[str]) -> Cond:
        """{"prompt_embeds": [N, L, D] Qwen3 hidden layer −2 at the real tokens, zero-padded to
        L = max_sequence_length, "prompt_mask": [N, L] int64, 1 on real tokens}."""
        return self._prompts.get(prompts)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, guidance: float) -> torch.Tensor:
        n = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(n)  # [N]
        feats = _unpad(cond["prompt_embeds"], cond["prompt_mask"])
        if guidance == 1.0:
            return -self._transformer(x, sigma, feats)
        neg = self._negative_cond()
        feats_u = _unpad(neg["prompt_embeds"], neg["prompt_mask"]) * n
        f_c, f_u = self._transformer(torch.cat([x, x]), torch.cat([sigma, sigma]), feats + feats_u).chunk(2)
        v = self.guide(-f_u, -f_c, guidance)
        keep = (1.0 - sigma) > self.cfg_truncation  # [N]: truncated rows take the conditional output
        return torch.where(keep.view(-1, *[1] * (v.dim() - 1)), -f_c, v)

    def guide(self, v_u: torch.Tensor, v_c: torch.Tensor, guidance: float) -> torch.Tensor:
        """v_u + g·(v_c − v_u) from the two branches' velocities, then (cfg_normalization k > 0) its
        norm per sample capped at k·‖v_c‖, as the pipeline caps f (flowpo.guided's split CFG calls it;
        `velocity` too). With cfg_grad='conditional' no gradient flows through v_u."""
        v = self._guided(v_u, v_c, guidance)  # [N, C, h, w]
        if self.cfg_normalization > 0:
            shape = (-1, *[1] * (v.dim() - 1))
            cap = (v_c.flatten(1).norm(dim=1) * self.cfg_normalization).view(shape)
            norm = v.flatten(1).norm(dim=1).view(shape)
            v = torch.where(norm > cap, v * cap / norm, v)
        return v

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents [N, C, h, w] → images [N, 3, H, W] fp32 in [0, 1] (z = x / scaling + shift)."""
        return vae_decode(self.pipe.vae, x)

    # -- internals ----------------------------------------------------------------------------

    def _timestep_kwargs(self, T: int) -> dict:
        """As ZImagePipeline: sigmas linspace(1, 1/T, T) and μ of the 2×2-patch count."""
        return {"sigmas": np.linspace(1.0, 1.0 / T, T), "mu": self._mu(self._image_seq_len(), default_max_shift=1.15)}

    def _image_seq_len(self) -> int:
        return (self.latent_shape[1] // 2) * (self.latent_shape[2] // 2)

    def _encode(self, prompts: list[str]) -> Cond:
        # list(...): the pipeline writes the templated text into the list it is given.
        embeds, _ = self.pipe.encode_prompt(prompt=list(prompts), device=self.device, do_classifier_free_guidance=False,
                                            max_sequence_length=self.max_sequence_length)  # N × [L_i, D]
        length, dim = self.max_sequence_length, embeds[0].shape[-1]
        out = embeds[0].new_zeros(len(embeds), length, dim)
        mask = torch.zeros(len(embeds), length, dtype=torch.long, device=out.device)
        for i, e in enumerate(embeds):
            out[i, : e.shape[0]] = e
            mask[i, : e.shape[0]] = 1
        return {"prompt_embeds": out, "prompt_mask": mask}

    def _transformer(self, x: torch.Tensor, sigma: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
        """The raw transformer output f_θ(x, 1 − σ) for x [M, C, h, w] and M caption tensors, fp32."""
        with autocast(self.device, self.dtype):
            out = self._trainable.active(
                list(x.to(self.dtype).unsqueeze(2).unbind(0)),  # M × [C, 1, h, w]
                1.0 - sigma,  # the pipeline's (1000 − t)/1000
                [f.to(self.dtype) for f in feats],
                return_dict=False,
            )[0]
        return torch.stack([o.float() for o in out]).squeeze(2)


def _unpad(embeds: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Rows [N, L, D] with masks [N, L] → N tensors [L_i, D] of the real tokens. A row without any
    (the all-zero dummy row of flowpo.lockstep) keeps its first position: the transformer needs one."""
    return [e[m.bool()] if bool(m.any()) else e[:1] for e, m in zip(embeds, mask)]
