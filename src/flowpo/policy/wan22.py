"""Wan2.2 text-to-video in the A14B layout (two experts) behind the `Policy` interface, with true CFG.

    policy = Wan22Policy.from_pretrained("/models/Wan2.2-T2V-A14B-Diffusers", dtype="bf16",
                                         resolution=(480, 832), num_frames=33, guidance_2=3.0)
    v = policy.velocity(x, sigma, policy.encode_prompts(prompts), guidance=4.0)

Source: diffusers `WanPipeline` (0.42) with `transformer_2` and `boundary_ratio`, and the Wan report
(Wan Team 2025, arXiv 2503.20314; Wan2.2's mixture of experts). Nothing is copied from it.

Experts. The pipeline denoises with `transformer` (high noise) while its timestep t ≥ b·1000
(b = `boundary_ratio`, 0.875 for T2V-A14B) and with `transformer_2` (low noise) after, using
`guidance_scale` for the first and `guidance_scale_2` for the second. The policy picks the expert
per row from the row's σ by the same test, so a batch may mix experts (each runs on its rows):

    expert(σ) = transformer   if t(σ) ≥ b·1000,   else transformer_2,

where t(σ) is the timestep the pipeline hands the transformer: its scheduler's timesteps. Wan2.2's
UniPC scheduler stores them as int64, ⌊1000·σ⌋; FlowMatchEuler keeps 1000·σ. The policy passes the
transformer (and tests the boundary on) the same value: ⌊1000·σ⌋ when the pipeline's scheduler
makes integer timesteps, else 1000·σ.

Guidance: v = v_u + g·(v_c − v_u) with g = `guidance` on the high-noise expert and
`guidance_2` (None = the same g, the pipeline's default) on the low-noise one; as in the
pipeline, guidance == 1 turns CFG off for both experts. Split CFG (`model.cfg_uncond`,
flowpo.guided) applies one g through `guide`, which is not told σ: with `guidance_2` set the
policy opts out of it (`negative` is None) and runs the joint 2N-row call.

LoRA: one adapter per expert (the experts are different networks; a LoRA shared between them
would tie two unrelated weight sets), both trained. `module` is `ExpertPair`, one nn.Module
holding both experts, so DDP/FSDP2/EMA/checkpoints see all trained weights; under FSDP2 the
blocks of both experts are the shard units (`fsdp_units`). `save_pretrained(dir)` writes the
high-noise expert's LoRA in `dir` and the low-noise one's in `dir/transformer_2`:

    pipe.load_lora_weights(dir); pipe.load_lora_weights(f"{dir}/transformer_2", load_into_transformer_2=True)

Full mode: `dir/transformer` and `dir/transformer_2` in diffusers format.

The rollout. The pipeline samples with UniPC multistep (a predictor-corrector of order 2 that
combines the current and the previous model outputs). flowpo's rollout instead takes its own
kernels (Euler for the ODE, Flow-GRPO's / DanceGRPO's SDE steps) on the pipeline's σ grid: each
trained transition must be a Gaussian in x_{t+1} given x_t alone, whose log-probability the update
recomputes; a multistep corrector's next state depends on earlier steps' outputs, so its per-step
likelihood is not defined. The grid, the per-step velocity and the expert switch are the
pipeline's; the sampler differs (tests/test_wan22.py compares each part).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from flowpo.policy.base import Cond
from flowpo.policy.diffusers_common import (
    PromptCache, TrainableTransformer, autocast, option_number, place_frozen, resolve_dtype,
)
from flowpo.policy.wan import DEFAULT_SIZE, WAN_LORA_TARGETS, WanPolicy


class ExpertPair(nn.Module):
    """Wan2.2's two experts as one module: `forward(expert, **kwargs)` calls `transformer` (expert 0,
    high noise) or `transformer_2` (expert 1). Going through this forward lets FSDP2's root unit
    gather the experts' non-block weights."""

    def __init__(self, transformer: nn.Module, transformer_2: nn.Module):
        super().__init__()
        self.transformer = transformer
        self.transformer_2 = transformer_2

    def forward(self, expert: int, **kwargs):
        return (self.transformer if expert == 0 else self.transformer_2)(**kwargs)

    def fsdp_units(self) -> list[nn.Module]:
        return [*self.transformer.blocks, *self.transformer_2.blocks]


class Wan22Policy(WanPolicy):
    """A two-expert WanPipeline (Wan2.2 T2V-A14B layout) as the policy; UMT5 and the VAE frozen.

    Args: as `WanPolicy`, plus
        guidance_2: the low-noise expert's guidance (the pipeline's guidance_scale_2); None = the
            same as the high-noise expert's (the pipeline's default).
        boundary_ratio: None = the pipeline's (model_index.json); a value overrides it.
    """

    pipeline_class_name = "WanPipeline"
    model_kind = "wan22"
    default_lora_targets = WAN_LORA_TARGETS
    frozen_components = ("text_encoder", "vae")
    config_fields = ("num_frames",)

    def __init__(
        self,
        pipe,
        *,
        dtype: str | torch.dtype = "fp32",
        mode: str = "lora",
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
        guidance_2: float | None = None,
        boundary_ratio: float | None = None,
    ):
        boundary = pipe.config.get("boundary_ratio") if boundary_ratio is None else option_number(
            "boundary_ratio", boundary_ratio)
        if getattr(pipe, "transformer_2", None) is None or pipe.transformer is None or boundary is None:
            raise ValueError("model.kind='wan22' needs a two-expert Wan2.2 pipeline (transformer, transformer_2 and "
                             "boundary_ratio in model_index.json); for a one-transformer folder use model.kind='wan'")
        if not 0.0 < float(boundary) < 1.0:
            raise ValueError(f"model.options.boundary_ratio={boundary}: must be in (0, 1) (T2V-A14B: 0.875)")
        if getattr(pipe.config, "expand_timesteps", False):
            raise ValueError("Wan22Policy does not support expand_timesteps pipelines (Wan2.2 TI2V-5B)")
        if cfg_grad not in ("conditional", "both"):
            raise ValueError(f"cfg_grad={cfg_grad!r}; allowed: 'conditional' (Flow-GRPO), 'both'")
        self.cfg_grad, self.pipe, self.negative_prompt = cfg_grad, pipe, negative_prompt
        self.device, self.dtype = torch.device(device), resolve_dtype(dtype)
        self.max_sequence_length = max_sequence_length
        self.boundary_ratio = float(boundary)
        self.guidance_2 = None if guidance_2 is None else option_number("guidance_2", guidance_2)
        if self.guidance_2 is not None:
            self.negative = None  # the guidance differs per expert, which `guide` (no σ) cannot tell: no split CFG
        place_frozen(pipe, self.frozen_components, self.device, self.dtype)
        experts = []
        for t in (pipe.transformer, pipe.transformer_2):
            t.to(self.device)
            experts.append(TrainableTransformer(
                t, mode=mode, dtype=self.dtype, lora_rank=lora_rank, lora_alpha=lora_alpha,
                lora_targets=list(lora_targets or self.default_lora_targets),
                gradient_checkpointing=gradient_checkpointing))
        self._experts = experts
        self._pair = ExpertPair(pipe.transformer, pipe.transformer_2)
        self._reference_pair = ExpertPair(experts[0].reference, experts[1].reference) if mode == "full" else None
        self._prompts = PromptCache(self._encode, prompt_cache_size)
        self._negative: Cond | None = None
        self._set_video_shape(pipe, resolution if resolution is not None else DEFAULT_SIZE, num_frames)
        probe = type(pipe.scheduler).from_config(pipe.scheduler.config)
        probe.set_timesteps(2, device="cpu")
        self.integer_timesteps = not probe.timesteps.is_floating_point()  # UniPC: int64 ⌊1000σ⌋

    # -- the two experts ------------------------------------------------------------------------

    @property
    def module(self) -> nn.Module:
        return self._pair

    @module.setter
    def module(self, wrapped: nn.Module) -> None:
        self._pair = wrapped

    @property
    def reference_module(self) -> nn.Module | None:
        return self._reference_pair

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self._experts[0].parameters() + self._experts[1].parameters()

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{k}": v for name, e in zip(("transformer", "transformer_2"), self._experts)
                for k, v in e.state_dict().items()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, e in zip(("transformer", "transformer_2"), self._experts):
            prefix = f"{name}."
            e.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        known = {f"{n}." for n in ("transformer", "transformer_2")}
        stray = [k for k in state if not any(k.startswith(p) for p in known)]
        if stray:
            raise KeyError(f"trainable state does not match this policy: unexpected {stray[:5]}")

    def disable_adapter(self) -> contextlib.AbstractContextManager:
        stack = contextlib.ExitStack()
        for e in self._experts:
            stack.enter_context(e.disable_adapter())
        return stack

    def save_pretrained(self, directory: str) -> None:
        """LoRA: the high-noise expert's in `directory`, the low-noise one's in
        `directory/transformer_2` (load it with `load_into_transformer_2=True`). Full:
        `directory/transformer` and `directory/transformer_2`."""
        high, low = self._experts
        high.save(directory, type(self.pipe))
        if low.mode == "lora":
            low.save(Path(directory) / "transformer_2", type(self.pipe))
        else:
            low.transformer.save_pretrained(str(Path(directory) / "transformer_2"), safe_serialization=True)

    # -- velocity -------------------------------------------------------------------------------

    def timesteps(self, sigma: torch.Tensor) -> torch.Tensor:
        """The transformer's timestep for σ, as the pipeline's scheduler makes it: ⌊1000σ⌋ (UniPC,
        int64 timesteps) or 1000σ."""
        t = sigma.double() * 1000.0
        return (torch.floor(t) if self.integer_timesteps else t).float()

    def experts_of(self, sigma: torch.Tensor) -> torch.Tensor:
        """[N] bool: True where the high-noise `transformer` runs (t(σ) ≥ boundary_ratio·1000)."""
        return self.timesteps(sigma) >= self.boundary_ratio * 1000.0

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, guidance: float) -> torch.Tensor:
        """Each row on its expert. When the experts are sharded by FSDP2, every call runs both
        experts in the same order on every rank (an expert without rows here runs one dummy row,
        its output joined to the result with weight 0): FSDP2's all-gathers and reduce-scatters
        pair up by order, and another rank may hold rows of the other expert."""
        n = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(n)  # [N]
        high = self.experts_of(sigma)
        pair = self._active_pair()
        collective = _is_sharded(pair) and n > 0
        parts = []
        for expert, mask in ((0, high), (1, ~high)):
            rows = mask.nonzero().flatten()
            if rows.numel() == 0 and not collective:
                continue
            take = rows if rows.numel() else rows.new_zeros(1)  # the dummy row: row 0
            g = guidance if (expert == 0 or self.guidance_2 is None or guidance == 1.0) else self.guidance_2
            parts.append((rows, self._guided_expert(pair, expert, x[take], sigma[take],
                                                    cond["prompt_embeds"][take], g)))
        if len(parts) == 1 and parts[0][0].numel() == n:
            return parts[0][1]
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for rows, v in parts:
            if rows.numel():
                out = out.index_put((rows,), v)
        if collective:  # the same graph on every rank: both experts' backward runs everywhere
            out = out + sum(0.0 * v.sum() for _, v in parts)
        return out

    def _active_pair(self) -> nn.Module:
        """The frozen reference pair inside `disable_adapter()` in full mode, else the trained one."""
        return self._reference_pair if (self._experts[0]._disabled and self._reference_pair is not None) else self._pair

    def _guided_expert(self, pair, expert: int, x, sigma, embeds, guidance: float) -> torch.Tensor:
        m = x.shape[0]
        if guidance == 1.0:
            return self._call(pair, expert, x, sigma, embeds).float()
        neg = self._negative_cond()["prompt_embeds"].to(embeds.device).expand(m, -1, -1)
        out = self._call(pair, expert, torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([neg, embeds]))
        v_u, v_c = out.float().chunk(2)
        return self._guided(v_u, v_c, guidance)

    def _call(self, pair, expert: int, x, sigma, embeds) -> torch.Tensor:
        with autocast(self.device, self.dtype):
            return pair(expert, hidden_states=x.to(self.dtype), timestep=self.timesteps(sigma),
                        encoder_hidden_states=embeds.to(self.dtype), return_dict=False)[0]


def _is_sharded(module: nn.Module) -> bool:
    """Whether FSDP2 sharded `module` (`fully_shard` makes its class an FSDPModule)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without distributed
        return False
    return isinstance(module, FSDPModule)
