"""`ocr`: text-rendering reward (Flow-GRPO's OCR task, arXiv 2505.05470 §4), on RapidOCR's PP-OCR
ONNX models (the `rapidocr` + `onnxruntime` extra: `pip install flowpo[ocr]`; the models ship in
the wheel, nothing downloads).

    target  t = the text between the first pair of double quotes in the prompt (or the sample's
            metadata field `text` when present), spaces removed, lower-cased
    read    o = the recognised texts (confidence >= min_confidence) joined, spaces removed, lower-cased
    d       = 0 if t is a substring of o, else min(Levenshtein(o, t), |t|)
    reward  = 1 − d / |t|                  ∈ [0, 1]

A prompt with no (or empty) quoted text and no `text` metadata is an error naming the prompt
(option `missing=zero` scores it 0 instead). RapidOCR runs with its angle classifier off and its
own box filter at `min_confidence` (Flow-GRPO's PaddleOCR call: cls=False, every box kept).
"""
from __future__ import annotations

import numpy as np
import torch

from flowpo.rewards.loading import RewardOptionError
from flowpo.rewards.preprocess import to_uint8


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def target_text(prompt: str, meta: dict | None) -> str | None:
    """The text the image should show: metadata `text`, else the first double-quoted span."""
    if meta and meta.get("text"):
        return str(meta["text"])
    parts = prompt.split('"')
    return parts[1] if len(parts) >= 3 else None


def ocr_reward(read: str, target: str) -> float:
    t = target.replace(" ", "").lower()
    o = read.replace(" ", "").lower()
    if not t:
        return 1.0
    d = 0 if t in o else min(levenshtein(o, t), len(t))
    return 1.0 - d / len(t)


class OCR:
    """Options: min_confidence (recognised boxes below it are ignored; 0 keeps all, as Flow-GRPO),
    missing (error | zero: a prompt without a quoted target), threads (onnxruntime intra-op threads;
    0: its default)."""

    def __init__(self, min_confidence: float = 0.0, missing: str = "error", threads: int = 0):
        if missing not in ("error", "zero"):
            raise RewardOptionError(f"reward.options.ocr.missing={missing!r} is unknown; choose error or zero")
        try:
            from rapidocr import RapidOCR
        except ImportError:
            raise RewardOptionError("reward 'ocr' needs RapidOCR: pip install 'flowpo[ocr]' "
                                    "(rapidocr + onnxruntime, no torch dependency)") from None
        # RapidOCR's own box filter (Global.text_score, default 0.5) would hide boxes below it, and its
        # angle classifier is on by default; Flow-GRPO keeps every box and reads without it
        params = {"Global.log_level": "error", "Global.text_score": float(min_confidence), "Global.use_cls": False}
        if threads > 0:
            params["EngineConfig.onnxruntime.intra_op_num_threads"] = int(threads)
        self.engine = RapidOCR(params=params)
        self.min_confidence, self.missing = float(min_confidence), missing

    def read(self, image: np.ndarray) -> str:
        """Recognised text of one BGR uint8 image [H, W, 3]."""
        out = self.engine(image)
        txts, scores = getattr(out, "txts", None), getattr(out, "scores", None)
        if not txts:
            return ""
        return "".join(t for t, s in zip(txts, scores or [1.0] * len(txts)) if s >= self.min_confidence)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str], metadata=None) -> torch.Tensor:
        metadata = metadata or [{} for _ in prompts]
        x = images if images.shape[1] != 1 else images.expand(-1, 3, -1, -1)
        arr = to_uint8(x[:, :3]).permute(0, 2, 3, 1).cpu().numpy()  # [N, H, W, RGB]
        out = []
        for img, p, m in zip(arr, prompts, metadata):
            t = target_text(p, m)
            if t is not None and not t.replace(" ", ""):
                t = None  # an empty quoted target ("") would score 1 for any image
            if t is None:
                if self.missing == "zero":
                    out.append(0.0)
                    continue
                raise RewardOptionError(f"reward 'ocr': prompt {p[:80]!r} has no (non-empty) text in double quotes "
                                        "and no metadata field 'text'; quote the text to render or set "
                                        "reward.options.ocr.missing=zero")
            out.append(ocr_reward(self.read(np.ascontiguousarray(img[..., ::-1])), t))
        return torch.tensor(out, dtype=torch.float32)
