"""The embedded default: a tiny prompt-conditioned rectified-flow velocity network.

Data: sklearn's 8×8 handwritten digits, upsampled ×2 bilinearly to 1×16×16 and scaled to [-1, 1].
Why 16×16: an 8×8 image is a single JPEG block, so the JPEG (in)compressibility rewards would
only see one DCT block and be nearly meaningless; 16×16 is still fast on a CPU.

Model: v_θ(x_σ, σ, c) ≈ ε − x0 for x_σ = (1 − σ)·x0 + σ·ε (σ = 1 noise, σ = 0 data).
- prompt encoder: word embeddings mean-pooled over non-PAD tokens → MLP → c ∈ R^E; the all-PAD
  (null) row uses a learned null vector instead (classifier-free guidance).
- time: sinusoidal embedding of 1000·σ → MLP → t ∈ R^E; conditioning e = t + c.
- body: a small U-Net (16×16 → 8×8 → 4×4 and back) of residual blocks with GroupNorm and FiLM,
  h ← GN(h)·(1 + γ(e)) + β(e). No dropout and no BatchNorm, so train() and eval() give the
  same outputs (the RL ratio must be exactly 1 on policy).

Forward: x [N, 1, 16, 16], sigma [N], tokens [N, L] → v [N, 1, 16, 16].
"""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

from flowpo.embedded.prompts import PAD, VOCAB

# Module-name suffixes that LoRA adapts (peft `target_modules`): the residual-block convolutions,
# their FiLM projections, and the prompt-encoder MLP.
LORA_TARGETS = ["conv1", "conv2", "film", "cond_fc1", "cond_fc2"]


def sinusoidal(sigma: torch.Tensor, dim: int) -> torch.Tensor:
    """[N] → [N, dim]: (cos(1000σ·ω_k), sin(1000σ·ω_k)), ω_k = 10000^(−k/(dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=sigma.device) / half)  # [dim/2]
    arg = 1000.0 * sigma.float()[:, None] * freqs[None]  # [N, dim/2]
    return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)


class ResBlock(nn.Module):
    """h → h + conv2(SiLU(FiLM(GN(conv1(SiLU(GN(h))))))), with a 1×1 skip if channels change."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(8, c_out)
        self.film = nn.Linear(emb_dim, 2 * c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        y = self.conv1(F.silu(self.norm1(h)))
        gamma, beta = self.film(e)[:, :, None, None].chunk(2, dim=1)  # [N, C, 1, 1] each
        y = self.norm2(y) * (1 + gamma) + beta
        y = self.conv2(F.silu(y))
        return self.skip(h) + y


class FlowNet(nn.Module):
    """Conditional velocity network (see module docstring). Widths c1 (16×16), c2 (8×8, 4×4)."""

    def __init__(self, vocab_size: int = len(VOCAB), c1: int = 16, c2: int = 48, emb_dim: int = 128,
                 tok_dim: int = 64):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, tok_dim, padding_idx=PAD)
        self.null = nn.Parameter(torch.zeros(tok_dim))
        self.cond_fc1 = nn.Linear(tok_dim, emb_dim)
        self.cond_fc2 = nn.Linear(emb_dim, emb_dim)
        self.time_fc1 = nn.Linear(64, emb_dim)
        self.time_fc2 = nn.Linear(emb_dim, emb_dim)
        self.stem = nn.Conv2d(1, c1, 3, padding=1)
        self.enc16 = ResBlock(c1, c1, emb_dim)
        self.down1 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.enc8 = ResBlock(c2, c2, emb_dim)
        self.down2 = nn.Conv2d(c2, c2, 3, stride=2, padding=1)
        self.mid4 = ResBlock(c2, c2, emb_dim)
        self.dec8 = ResBlock(2 * c2, c2, emb_dim)
        self.up = nn.Conv2d(c2, c1, 3, padding=1)
        self.dec16 = ResBlock(2 * c1, c1, emb_dim)
        self.out_norm = nn.GroupNorm(8, c1)
        self.out = nn.Conv2d(c1, 1, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """[N, L] token ids → [N, tok_dim]: mean of non-PAD embeddings, or `null` if all PAD."""
        mask = (tokens != PAD).float()  # [N, L]
        count = mask.sum(1, keepdim=True)  # [N, 1]
        pooled = (self.tok_emb(tokens) * mask[..., None]).sum(1) / count.clamp(min=1)  # [N, tok_dim]
        return torch.where(count > 0, pooled, self.null.expand_as(pooled))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        c = self.cond_fc2(F.silu(self.cond_fc1(self.encode(tokens))))  # [N, E]
        t = self.time_fc2(F.silu(self.time_fc1(sinusoidal(sigma, 64))))  # [N, E]
        e = F.silu(c + t)  # [N, E]
        h16 = self.enc16(self.stem(x), e)  # [N, c1, 16, 16]
        h8 = self.enc8(self.down1(h16), e)  # [N, c2, 8, 8]
        h4 = self.mid4(self.down2(h8), e)  # [N, c2, 4, 4]
        u8 = self.dec8(torch.cat([F.interpolate(h4, scale_factor=2.0, mode="nearest"), h8], 1), e)
        u16 = self.up(F.interpolate(u8, scale_factor=2.0, mode="nearest"))  # [N, c1, 16, 16]
        u16 = self.dec16(torch.cat([u16, h16], 1), e)
        return self.out(F.silu(self.out_norm(u16)))  # [N, 1, 16, 16]


def guided_velocity(net: nn.Module, x: torch.Tensor, sigma: torch.Tensor, tokens: torch.Tensor,
                    guidance: float, detach_uncond: bool = False) -> torch.Tensor:
    """v(x, σ | tokens) with true classifier-free guidance v_u + g·(v_c − v_u) (the null prompt is
    all PAD); one forward when g = 1. x [N, 1, 16, 16], sigma [N], tokens [N, L] → fp32.
    detach_uncond: no gradient through v_u (Flow-GRPO's training; the values are unchanged)."""
    if guidance == 1.0:
        return net(x, sigma, tokens).float()
    null = torch.full_like(tokens, PAD)  # [N, L]
    v_c, v_u = net(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([tokens, null])).chunk(2)
    if detach_uncond:
        v_u = v_u.detach()
    return (v_u + guidance * (v_c - v_u)).float()
