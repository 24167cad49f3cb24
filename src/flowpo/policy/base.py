"""The narrow interface every model sits behind (STYLE.md guideline 9: no RL logic here).

Shapes: N samples, latent per sample D = (C, H, W) for images or (C, F, H, W) for video.
A `Cond` is a dict of tensors whose first dimension is N (prompt embeddings, token ids, ...);
rows can be selected with `select_cond(cond, idx)`.
"""
from __future__ import annotations

from typing import ContextManager, Protocol, runtime_checkable

import torch
from torch import nn

Cond = dict[str, torch.Tensor]


def select_cond(cond: Cond, idx: torch.Tensor | slice) -> Cond:
    """Rows `idx` of every tensor in `cond` (a tensor index is moved to each tensor's device)."""
    if isinstance(idx, torch.Tensor):
        return {k: v[idx.to(v.device)] for k, v in cond.items()}
    return {k: v[idx] for k, v in cond.items()}


def cat_cond(conds: list[Cond]) -> Cond:
    """Concatenate conds along the batch dimension."""
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


@runtime_checkable
class Policy(Protocol):
    """What the trainer needs from a model.

    - `velocity(x, sigma, cond, guidance)`: v_θ(x, σ | c) with guidance applied inside
      (true CFG v_u + g·(v_c − v_u) for SD3 and the embedded model; FLUX's guidance embedding).
      x: [N, *D]; sigma: [N] in [0, 1]; returns fp32 [N, *D]. Convention: x_σ = (1−σ)x0 + σε,
      v = ε − x0.
    - `sigmas(T, shift)`: the model's own σ grid of T steps, fp32 [T + 1] from 1 to 0 (the
      pipeline scheduler's `set_timesteps(T)` for diffusers models, with their dynamic shift;
      flowpo's shifted grid for the embedded model, where `shift` applies).
    - `evals_per_row(guidance)`: model evaluations one row of `velocity` costs (2 with true CFG
      at guidance ≠ 1, else 1); the trainer multiplies by rows to count `nfe`.
    - `decode(x)`: latents [N, *D] → images [N, 3 or 1, H, W] float in [0, 1] (fp32).
    - `module`: the nn.Module holding trainable parameters (for DDP/FSDP wrapping, EMA, saving).
    - `disable_adapter()`: context in which `velocity` is the reference (frozen base) policy.
    """

    latent_shape: tuple[int, ...]
    module: nn.Module

    def encode_prompts(self, prompts: list[str]) -> Cond: ...

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, guidance: float) -> torch.Tensor: ...

    def evals_per_row(self, guidance: float) -> int: ...

    def sigmas(self, T: int, shift: float) -> torch.Tensor: ...

    def decode(self, x: torch.Tensor) -> torch.Tensor: ...

    def trainable_parameters(self) -> list[nn.Parameter]: ...

    def disable_adapter(self) -> ContextManager: ...

    def trainable_state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    def save_pretrained(self, directory: str) -> None: ...

