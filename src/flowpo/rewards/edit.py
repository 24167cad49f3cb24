"""Edit rewards: how much of the source image an edit keeps.

`image_consistency`: the CLIP image-image cosine similarity between the edited image and its
source (the row's metadata `images`, flowpo.prompts),

    s = cos(f(edit), f(source)),   f = the L2-normalised CLIP image feature,

the consistency term of flow_grpo's FLUX.1-Kontext task, where it keeps the edit close to the
original while a task reward (GenEval counting there) scores the instruction. Combine it with any
text-image reward through the reward weights, e.g.

    reward.names=[pickscore, image_consistency]  reward.weights=[1.0, 0.5]

Options: path (a CLIP folder, e.g. openai/clip-vit-large-patch14), processor_path, source (which
of a row's source images: "first", default, or "mean": the mean similarity over all of them),
scaling (cosine, default; clamped: max(cos, 0)), device, dtype. Both images go through the same
tensor preprocessing as the CLIP scorers (flowpo.rewards.preprocess); sources are read once and
kept (a bounded cache of their features).
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from flowpo.rewards.clip import _CLIP
from flowpo.rewards.loading import RewardOptionError

SCALINGS = {"cosine": lambda c: c, "clamped": lambda c: c.clamp_min(0)}


def read_image(path: str) -> torch.Tensor:
    """An image file → [3, H, W] fp32 in [0, 1] (RGB)."""
    import numpy as np

    from flowpo.policy.edit import open_source

    arr = np.asarray(open_source(path), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255


class ImageConsistency(_CLIP):
    """CLIP image-image similarity with the source image (see the module docstring)."""

    reward = "image_consistency"
    what = "a CLIP model (e.g. openai/clip-vit-large-patch14)"

    def __init__(self, path: str | None = None, processor_path: str | None = None, source: str = "first",
                 scaling: str = "cosine", device: str = "auto", dtype: str = "float32", quantize: bool = True,
                 cache_size: int = 4096):
        if scaling not in SCALINGS:
            raise RewardOptionError(f"reward.options.image_consistency.scaling={scaling!r} is unknown; choose one "
                                    f"of {list(SCALINGS)}")
        if source not in ("first", "mean"):
            raise RewardOptionError(f"reward.options.image_consistency.source={source!r} is unknown; choose "
                                    "'first' (the row's first source image) or 'mean' (over all of them)")
        super().__init__(path, processor_path, device, dtype, quantize)
        self.source, self.scale, self.cache_size = source, SCALINGS[scaling], cache_size
        self._features: OrderedDict[str, torch.Tensor] = OrderedDict()

    def source_features(self, path: str) -> torch.Tensor:
        """The normalised CLIP feature of the source image at `path` [F], cached."""
        if path not in self._features:
            self._features[path] = self.image_features(read_image(path)[None])[0]
            while len(self._features) > self.cache_size:
                self._features.popitem(last=False)
        self._features.move_to_end(path)
        return self._features[path]

    def _sources(self, meta: dict, i: int) -> list[str]:
        paths = list(meta.get("images") or [])
        if not paths:
            raise RewardOptionError(f"reward 'image_consistency': row {i} has no source image; its prompt row "
                                    "needs 'image' or 'images' (a .jsonl prompts file)")
        return paths if self.source == "mean" else paths[:1]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> torch.Tensor:
        metadata = metadata if metadata is not None else [{}] * len(images)
        edited = self.image_features(images)                                            # [N, F]
        out = []
        for i, meta in enumerate(metadata):
            src = torch.stack([self.source_features(p) for p in self._sources(meta, i)])  # [k, F]
            out.append((src @ edited[i]).mean())
        return self.scale(torch.stack(out)).cpu()
