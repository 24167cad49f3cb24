"""Scorers the reward-service tests serve from a real `flowpo serve-reward` process (importable
from the tests folder, which the tests put on the server's PYTHONPATH)."""
from __future__ import annotations

import os
import time

import torch


def rowwise(images, prompts, metadata):
    """Each image on its own: the mean of its pixels, plus its digit target (a detail field)."""
    flat = images.float().reshape(images.shape[0], -1)
    return {"scores": flat.mean(1) + 0.01 * flat.std(1),
            "target": torch.tensor([float(m.get("target", -1)) for m in metadata])}


def slow(images, prompts, metadata, seconds_per_image: float = 0.0):
    """rowwise after sleeping a fixed time per image (a scorer as slow as wanted)."""
    time.sleep(seconds_per_image * images.shape[0])
    return rowwise(images, prompts, metadata)["scores"]


def jittery(images, prompts, metadata):
    """rowwise after a random sleep: the thread timing changes from run to run, the scores must not."""
    time.sleep(float(torch.rand(())) * 0.05)
    return rowwise(images, prompts, metadata)["scores"]


def nan_scorer(images, prompts, metadata):
    out = rowwise(images, prompts, metadata)["scores"]
    out[0] = float("nan")
    return out


def raises(images, prompts, metadata):
    raise RuntimeError("the detector ran out of memory")


_CALLS = {"n": 0}


def dies(images, prompts, metadata):
    """rowwise, but the whole server process exits at call FLOWPO_TEST_DIE_AT (1-based)."""
    _CALLS["n"] += 1
    if _CALLS["n"] >= int(os.environ.get("FLOWPO_TEST_DIE_AT") or 10**9):
        os._exit(3)
    return rowwise(images, prompts, metadata)["scores"]


def fails_on_rank_1(images, prompts, metadata):
    """A local scorer that fails on torchrun rank 1 only, from its 3rd call on: the preflight and
    the first evaluation pass, so the failure happens inside an iteration (with reward.overlap:
    while the rank samples its next chunk)."""
    _CALLS["rank1"] = _CALLS.get("rank1", 0) + 1
    if os.environ.get("RANK") == "1" and _CALLS["rank1"] >= 3:
        raise RuntimeError("rank 1's scorer is broken")
    return rowwise(images, prompts, metadata)["scores"]
