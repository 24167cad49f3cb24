"""The optimizer and its learning-rate schedule (`train.*` in flowpo.config.TrainConfig)."""
from __future__ import annotations

import math

import torch


def build_optimizer(params: list[torch.nn.Parameter], t) -> torch.optim.AdamW:
    """AdamW over the trainable parameters with train.lr, betas, adam_eps and weight_decay (a value
    torch refuses is raised as a ConfigError naming the train.* keys, not in torch's words)."""
    try:
        return torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), eps=t.adam_eps, weight_decay=t.weight_decay)
    except ValueError as e:
        from flowpo.errors import ConfigError

        raise ConfigError(f"the optimizer refuses train.lr={t.lr}, train.betas={list(t.betas)}, train.adam_eps="
                          f"{t.adam_eps}, train.weight_decay={t.weight_decay} ({e}); fix the key it names") from None


def lr_at(t, it: int) -> float:
    """Learning rate of iteration `it` under train.lr_schedule, with x = min(1, it / horizon), horizon
    = train.lr_horizon (a run fixes it to its train.iterations when it starts, so extending a run
    with --resume keeps the schedule continuous: past the horizon the rate stays at lr_final·lr):

        constant: lr
        linear:   lr·(lr_final + (1 − lr_final)·(1 − x))
        cosine:   lr·(lr_final + (1 − lr_final)·(1 + cos πx)/2)

    A function of the iteration alone, so a resumed run follows the same schedule.
    """
    if t.lr_schedule == "constant":
        return t.lr
    horizon = t.lr_horizon if t.lr_horizon is not None else t.iterations
    x = min(1.0, it / max(1, horizon))
    f = 1.0 - x if t.lr_schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * x))
    return t.lr * (t.lr_final + (1.0 - t.lr_final) * f)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def check_grad_norm(norm: float, iteration: int, model) -> None:
    """Raise before the optimizer step when the clipped gradient norm is NaN/inf, naming the fixes
    (in bf16/fp16 also the attention kernel); `model` is the config's ModelConfig."""
    if math.isfinite(norm):
        return
    raise FloatingPointError(
        f"non-finite gradient norm ({norm}) at iteration {iteration}; the weights were not updated. Lower "
        "train.lr or check the rewards; resume from the last checkpoint"
        + (". In bf16/fp16 on a GPU, also try model.attention=math (a fused attention kernel's backward can "
           "return NaN/inf; docs/gpu.md) or model.dtype=fp32"
           if model.dtype != "fp32" and model.attention != "math" else ""))
