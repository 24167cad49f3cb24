"""Exponential moving average of the trainable weights: the evaluation EMA (train.ema > 0) and
the objectives' old-policy copy θ_old (objective.old_ramp > 0).

`swapped()` puts the shadow into the parameters for a while. On plain tensors (one process, LoRA on
any number of ranks) a swap exchanges the storage of each parameter and its shadow, O(1) with no
weight copied; FSDP2's DTensor shards are copied in and out (`EMA.swap`)."""
from __future__ import annotations

import contextlib

import torch


class EMA:
    """θ_ema ← d·θ_ema + (1−d)·θ over the trainable parameters."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params, self.decay = params, decay
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self, decay: float | None = None) -> None:
        """One step with train.ema's decay, or with `decay` (a schedule's value: the objectives'
        old-policy copy θ_old ← η·θ_old + (1 − η)·θ)."""
        d = self.decay if decay is None else decay
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1 - d)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the parameters' values with the shadow's.

        Plain tensors exchange storage, O(1) per parameter: the Parameter objects (which the
        optimizer and the module hold) stay, their `.data` becomes the shadow's tensor and the
        shadow takes the old one, so nothing is copied and two swaps restore the original storage
        (the Parameters are the same objects throughout; the shadow list holds new tensor objects).
        DTensor parameters (FSDP2's shards) are copied in and out as before: FSDP2 keeps its own
        references to the sharded parameters' storage, which a `.data` exchange would bypass."""
        for i, (s, p) in enumerate(zip(self.shadow, self.params)):
            if type(p.data) is torch.Tensor and type(s) is torch.Tensor:
                p.data, self.shadow[i] = s, p.data
            else:
                tmp = p.detach().clone()
                p.copy_(s)
                s.copy_(tmp)

    @contextlib.contextmanager
    def swapped(self):
        """Context with the EMA weights in the parameters (evaluation, θ_old's rollouts)."""
        self.swap()
        try:
            yield
        finally:
            self.swap()


class NoEMA:
    """No copy (train.ema = 0, or an objective without an old policy): the live weights are used;
    nothing to update or checkpoint."""

    shadow: list = []

    def update(self, decay: float | None = None) -> None:
        pass

    def swapped(self):
        return contextlib.nullcontext()


def build_ema(params: list, decay: float):
    """EMA for train.ema > 0, else NoEMA."""
    return EMA(params, decay) if decay > 0 else NoEMA()
