"""A small CNN digit classifier on 1×16×16 images in [0, 1] (the `digit_alignment` reward).

Trained by `flowpo.embedded.pretrain` on the train split only, with light augmentation (`augment`: ±1 px
shifts, pixel noise, occasional blur, contrast jitter) so that it does not give confident
nonsense on slightly off-distribution generated images.

Forward: x [N, 1, 16, 16] in [0, 1] → logits [N, 10].
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


class DigitClassifier(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.conv3 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.conv4 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = 2 * x - 1  # [N, 1, 16, 16] centred
        h = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(h)))), 2)  # [N, w, 8, 8]
        h = F.max_pool2d(F.relu(self.conv4(F.relu(self.conv3(h)))), 2)  # [N, 2w, 4, 4]
        return self.fc(h.flatten(1))  # [N, 10]


def blur(x: torch.Tensor) -> torch.Tensor:
    """3×3 binomial blur ([1, 2, 1]/4 ⊗ [1, 2, 1]/4) of [N, 1, H, W], replicate padding."""
    k = torch.tensor([1.0, 2.0, 1.0], device=x.device) / 4
    k2 = (k[:, None] * k[None, :])[None, None]  # [1, 1, 3, 3]
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k2)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Light augmentation of [N, 1, 16, 16] in [0, 1]: shift ±1 px, blur (p = 0.3),
    contrast ×U(0.8, 1.1), Gaussian noise with std U(0, 0.08); clamped to [0, 1]."""
    n = x.shape[0]
    pad = F.pad(x, (1, 1, 1, 1))  # [N, 1, 18, 18]
    dx, dy = torch.randint(0, 3, (2, n), generator=gen)
    x = torch.stack([pad[i, :, dy[i]:dy[i] + 16, dx[i]:dx[i] + 16] for i in range(n)])
    use_blur = (torch.rand(n, generator=gen) < 0.3)[:, None, None, None]
    x = torch.where(use_blur, blur(x), x)
    x = x * (0.8 + 0.3 * torch.rand(n, 1, 1, 1, generator=gen))
    x = x + 0.08 * torch.rand(n, 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)
    return x.clamp(0, 1)
