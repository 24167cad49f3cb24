"""Reward scorers: a registry by name, user scorers by dotted path, and weighted multi-reward.

A scorer is `fn(images, prompts) -> rewards` with
    images:  float tensor [N, C, H, W] in [0, 1] (the policy's `decode` output),
    prompts: list[str] of length N,
    returns: float tensor (or array/list) [N], larger is better.
A user scorer plugs in as `reward.names=[my_package.my_module:my_function]`.

`score_all` calls each scorer once per batch and refuses NaN/inf or exceptions with a message
that names the reward and how many samples were bad, so no silent NaN reaches the weights.
"""
from __future__ import annotations

import importlib
from typing import Callable

import torch

from flowpo.errors import ConfigError

Scorer = Callable[[torch.Tensor, list[str]], torch.Tensor]


class RewardError(RuntimeError):
    """A reward scorer failed or returned non-finite values (a runtime failure: exit code 1)."""


class RewardNameError(ConfigError, RewardError):
    """An unknown reward name or a dotted path that does not import (bad input: exit code 2)."""


def _builtin() -> dict[str, Scorer]:
    from flowpo.embedded.rewards import EMBEDDED_REWARDS

    return dict(EMBEDDED_REWARDS)


def available() -> list[str]:
    return sorted(_builtin())


def get_scorer(name: str) -> Scorer:
    """A registered name or `package.module:function`."""
    if ":" in name:
        mod_name, _, fn_name = name.partition(":")
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as e:
            raise RewardNameError(f"reward {name!r}: cannot import module {mod_name!r} ({e}); "
                              "check the dotted path package.module:function and that it is installed") from None
        fn = getattr(mod, fn_name, None)
        if not callable(fn):
            raise RewardNameError(f"reward {name!r}: module {mod_name!r} has no callable {fn_name!r}")
        return fn
    registry = _builtin()
    if name not in registry:
        raise RewardNameError(f"unknown reward {name!r}; registered: {sorted(registry)}, "
                          "or give a dotted path package.module:function")
    return registry[name]


class RewardSet:
    """Several weighted scorers. `score(images, prompts) -> [N, K]` raw rewards (K scorers), fp32 on
    the CPU whatever device a scorer returns them on."""

    def __init__(self, names: list[str], weights: list[float]):
        if len(names) != len(weights):
            raise RewardError(f"{len(names)} rewards {names} but {len(weights)} weights {weights}")
        self.names = list(names)
        self.weights = torch.tensor(weights, dtype=torch.float32)  # [K]
        self.scorers = [get_scorer(n) for n in names]

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        n = images.shape[0]
        cols = []
        for name, fn in zip(self.names, self.scorers):
            try:
                r = fn(images, prompts)
            except Exception as e:  # noqa: BLE001 - re-raised with the reward's name
                raise RewardError(f"reward {name!r} raised {type(e).__name__}: {e} "
                                  f"(scoring {n} samples)") from e
            r = torch.as_tensor(r).detach().to("cpu", torch.float32).reshape(-1)  # rewards live on the CPU
            if r.numel() != n:
                raise RewardError(f"reward {name!r} returned {r.numel()} values for {n} samples; "
                                  "a scorer must return one value per image")
            bad = int((~torch.isfinite(r)).sum())
            if bad:
                raise RewardError(f"reward {name!r} returned NaN/inf for {bad} of {n} samples; "
                                  "fix the scorer (nothing was written to the weights)")
            cols.append(r)
        return torch.stack(cols, dim=1)  # [N, K]

    def combine(self, raw: torch.Tensor) -> torch.Tensor:
        """Weighted sum Σ_k w_k r_k → [N]."""
        return raw @ self.weights
