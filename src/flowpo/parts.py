"""Build the parts a config names, once (STYLE.md guideline 1): policy, plan, prompt sets."""
from __future__ import annotations

import math

import torch

from flowpo.config import Config
from flowpo.errors import ConfigError
from flowpo.plans import Plan, build_plan as _build_plan
from flowpo.prompts import PromptSet, read_prompt_file


def resolve_device(name: str) -> torch.device:
    """'auto' → cuda:LOCAL_RANK when CUDA is available, else cpu."""
    if name == "auto":
        import os

        if torch.cuda.is_available():
            return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
        return torch.device("cpu")
    return torch.device(name)


def resolve_threads(threads: int) -> int:
    """`train.threads`: 0 → every usable core but one (at least 1). torch's OpenMP threads wait for
    each other at every parallel region, so a thread that shares its core with another busy process
    (a second run, a reward service, a test suite) stalls them all: on 2 cores, 2 threads beside one
    busy process measured 3–49× slower per iteration, 1 thread 1.02× (benchmarks/shared_machine.py).
    Leaving a core free trades some speed on an idle machine (2 cores: 1.5×) for that."""
    if threads:
        return threads
    import os

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, usable - 1)


ATTENTION_BACKENDS = ("math", "flash", "efficient", "cudnn")


def _sdpa_switches() -> dict:
    """ATTENTION_BACKENDS → (getter, setter) of torch's process-wide CUDA SDPA kernel flags."""
    c = torch.backends.cuda
    return {"math": (c.math_sdp_enabled, c.enable_math_sdp), "flash": (c.flash_sdp_enabled, c.enable_flash_sdp),
            "efficient": (c.mem_efficient_sdp_enabled, c.enable_mem_efficient_sdp),
            "cudnn": (c.cudnn_sdp_enabled, c.enable_cudnn_sdp)}


def set_attention(kind: str) -> dict[str, bool]:
    """`model.attention`: switch torch's CUDA scaled-dot-product-attention kernels process-wide.

    Process-wide (torch.backends.cuda flags) rather than a context manager on purpose: gradient
    checkpointing recomputes the forward inside backward(), outside any context the forward ran in,
    and the recomputation must use the same kernel. 'auto' leaves the flags as they are. Returns the
    flags as they were before, for `restore_attention`.
    """
    switches = _sdpa_switches()
    before = {name: get() for name, (get, _) in switches.items()}
    if kind == "auto":
        return before
    if kind not in ATTENTION_BACKENDS:
        raise ValueError(f"model.attention={kind!r} is unknown; allowed: auto, {', '.join(ATTENTION_BACKENDS)}")
    for name, (_, enable) in switches.items():
        enable(name == kind)
    return before


def restore_attention(flags: dict[str, bool]) -> None:
    """Put back flags returned by `set_attention`."""
    for name, (_, enable) in _sdpa_switches().items():
        enable(flags[name])


def build_policy(m):
    """The policy adapter for `model.kind` (ModelConfig `m`), on `model.device`."""
    set_attention(m.attention)
    device = resolve_device(m.device)
    if m.kind == "embedded":
        from flowpo.policy.embedded import EmbeddedPolicy

        policy = EmbeddedPolicy(mode=m.mode, lora_rank=m.lora_rank, lora_alpha=m.lora_alpha, weights=m.path,
                                cfg_grad=m.cfg_grad)
        policy.module.to(device)
        if getattr(policy, "_ref", None) is not None:
            policy._ref.to(device)
        return policy
    from flowpo.policy.registry import policy_class

    if not m.path:
        raise ValueError(f"model.kind={m.kind!r} needs model.path: a local diffusers pipeline folder "
                         "(the one holding model_index.json)")
    for key, kinds in (("max_area", ("flux_kontext",)), ("image_resolution", ("flux_kontext", "qwen_image_edit"))):
        if getattr(m, key) is not None and m.kind not in kinds:
            raise ConfigError(f"model.{key} applies to model.kind in {list(kinds)}, not {m.kind!r}; remove it")
    return policy_class(m.kind).from_config(m, device=str(device))  # DiffusersPolicy.from_config


def build_plan(cfg: Config, sigmas: torch.Tensor) -> Plan:
    p, T = cfg.plan, cfg.sample.steps
    return _build_plan(
        p.kind, sigmas, train_fraction=p.train_fraction, subset_fraction=p.subset_fraction,
        window_min=p.window_min, window_max=p.window_size,
        window_range=(0, max(p.num_steps if p.kind == "random_steps" else p.window_size,
                             min(T - 1, math.ceil(T * p.window_range)))),
        window_size=p.window_size, num_steps=p.num_steps, strategy=p.strategy, stride=p.stride, interval=p.tau,
        decay=p.tau_decay, min_interval=p.tau_min,
        truncate_sigma_min=p.truncate_at if p.truncate == "sigma" else None,
        truncate_fraction=p.truncate_at if p.truncate == "fraction" else None,
        strata=p.strata, strata_first=p.strata_first)


def train_prompt_pool(cfg: Config) -> PromptSet:
    """Training prompts: `sample.prompts_file` (.txt or .jsonl with metadata), or every (digit,
    training template) of the embedded model."""
    if cfg.sample.prompts_file:
        return read_prompt_file(cfg.sample.prompts_file, "sample.prompts_file")
    from flowpo.embedded.prompts import train_prompts

    return PromptSet([p for d in range(10) for p in train_prompts(d)])


def eval_prompts(cfg: Config) -> PromptSet:
    """`eval.prompts` held-out prompts fixed by `eval.seed` (the same at every evaluation): from
    `eval.prompts_file`, or the embedded held-out templates with the digits balanced."""
    g = torch.Generator().manual_seed(cfg.eval.seed)
    if cfg.eval.prompts_file:
        pool = read_prompt_file(cfg.eval.prompts_file, "eval.prompts_file")
        if len(pool) >= cfg.eval.prompts:
            return pool.take(torch.randperm(len(pool), generator=g)[: cfg.eval.prompts])
        return pool.take([i % len(pool) for i in range(cfg.eval.prompts)])
    from flowpo.embedded.prompts import heldout_prompts

    out = []
    for i in range(cfg.eval.prompts):
        options = heldout_prompts(i % 10)
        out.append(options[int(torch.randint(len(options), (1,), generator=g))])
    return PromptSet(out)
