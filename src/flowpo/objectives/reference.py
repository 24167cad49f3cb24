"""The frozen reference's outputs of one iteration, kept across the inner epochs.

The reference terms (the clipped surrogate's KL to the reference step means, DiffusionNFT's and
AWM's ‖v_θ − v_ref‖²) run the frozen reference (`policy.disable_adapter()`: adapters off, or the
frozen copy in full fine-tuning) at the update's inputs. Within an iteration those inputs are the
same in every pass over the samples (the stored states; the x_σ of the final samples, whose noise
is drawn once in `begin`), and so are the reference weights: with `train.inner_epochs` = E the
reference would compute the same numbers E times. `ReferenceCache` keeps the first pass's output
per (chunk, step) and hands it back in the later passes; the objective clears it at the end of the
iteration (`train.cache_reference`; off, or E = 1, nothing is kept).

A chunk is the row-index tensor the trainer passes to `chunk_loss`: the update reuses the same
chunk objects in every pass, so the key is the object itself (kept alive by the cache, so its id
cannot be taken by another), not its rows. That matters under lock-step, where a rank's empty
parts of several chunks hold equal (empty) rows but each is its own model call on the other
ranks: keyed by object, every rank recomputes and reuses exactly the same calls.
"""
from __future__ import annotations

from typing import Callable

import torch


class ReferenceCache:
    """{(chunk, step): reference output} of the current iteration; a pass-through when disabled."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._kept: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, idx: torch.Tensor, t: int, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """compute() the first time chunk `idx` asks at step t this iteration, its kept value after."""
        if not self.enabled:
            return compute()
        key = (id(idx), int(t))
        hit = self._kept.get(key)
        if hit is not None and hit[0] is idx:
            return hit[1]
        value = compute().detach()
        self._kept[key] = (idx, value)
        return value

    def clear(self) -> None:
        """Forget the iteration's outputs (the reference's inputs change with the next rollout)."""
        self._kept = {}

    def __len__(self) -> int:
        return len(self._kept)


def reference_cache(cfg) -> ReferenceCache:
    """The cache a run config asks for: on when train.cache_reference and train.inner_epochs > 1."""
    return ReferenceCache(bool(cfg.train.cache_reference) and cfg.train.inner_epochs > 1)
