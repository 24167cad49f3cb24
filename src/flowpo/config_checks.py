"""Range and cross-field checks of a run config (flowpo.config.validate calls `check`).

Each failure is one ConfigError line: the key, the bad value, and what is allowed.
"""
from __future__ import annotations

from flowpo.errors import ConfigError, show

SEED_MAX = 2 ** 63 - 1
"""Seeds are integers from 0 to 2**63 - 1 (torch.manual_seed's range, kept exact)."""

CFG_FREE_OBJECTIVES = ("diffusion_nft", "awm")
"""Objectives whose authors train without CFG (guidance 1): a guidance ≠ 1 needs objective.allow_cfg."""

THREADS_MAX = 1024
"""train.threads' ceiling (torch's OpenMP pool would otherwise try to start that many threads)."""


def _check_range(key: str, value: float, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False) -> None:
    if value is None:
        return
    bad = (lo is not None and (value <= lo if lo_open else value < lo)) or (hi is not None and value > hi)
    if bad:
        lo_s = "" if lo is None else (f"> {lo}" if lo_open else f">= {lo}")
        hi_s = "" if hi is None else f"<= {hi}"
        allowed = " and ".join(s for s in (lo_s, hi_s) if s)
        raise ConfigError(f"{key}={show(value)} is out of range; allowed: {allowed}")


def check(cfg) -> None:
    """Range and cross-field checks of a whole config; raises ConfigError naming the key."""
    s, p, t, m = cfg.sample, cfg.plan, cfg.train, cfg.model
    _check_range("model.lora_rank", m.lora_rank, 1)
    _check_range("model.lora_alpha", m.lora_alpha, 0, lo_open=True)
    _check_range("model.resolution", m.resolution, 1)
    _check_range("model.max_sequence_length", m.max_sequence_length, 1)
    _check_range("model.num_frames", m.num_frames, 1)
    _check_range("model.max_area", m.max_area, 1)
    _check_range("model.image_resolution", m.image_resolution, 1)
    _check_range("sample.steps", s.steps, 2)
    _check_range("sample.shift", s.shift, 0, lo_open=True)
    _check_range("sample.guidance", s.guidance, 0)
    _check_range("sample.noise_level", s.noise_level, 0)
    _check_range("sample.prompts_per_iteration", s.prompts_per_iteration, 1)
    _check_range("sample.group_size", s.group_size, 2)
    _check_range("sample.batch_size", s.batch_size, 1)
    from flowpo.config_schema import RESOLVED_KEYS

    bad = [k for k in cfg.resolved if k not in RESOLVED_KEYS]
    if bad:
        raise ConfigError(f"resolved={show(cfg.resolved)}: {show(bad)} cannot be run-resolved; allowed: {list(RESOLVED_KEYS)}")
    if s.sigmas is not None:
        from flowpo.schedule import check_grid

        try:
            check_grid(s.sigmas, s.steps)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    _check_range("plan.train_fraction", p.train_fraction, 0, 1, lo_open=True)
    _check_range("plan.subset_fraction", p.subset_fraction, 0, 1, lo_open=True)
    _check_range("plan.window_size", p.window_size, 1)
    _check_range("plan.window_min", p.window_min, 1)
    if p.kind in ("sliding_window", "random_window"):  # the plans with a window (others ignore its size)
        _check_range("plan.window_size", p.window_size, 1, s.steps - 1)
        _check_range("plan.window_min", p.window_min, 1, p.window_size)
    _check_range("plan.window_range", p.window_range, 0, 1, lo_open=True)
    _check_range("plan.num_steps", p.num_steps, 1)
    if p.kind == "random_steps":  # drawn from the first ⌈T·window_range⌉ steps (at most T − 1)
        import math

        pool = min(s.steps - 1, math.ceil(s.steps * p.window_range))
        if p.num_steps > pool:
            raise ConfigError(f"plan.num_steps={p.num_steps} is more than the {pool} steps random_steps draws from "
                              f"(the first plan.window_range={show(p.window_range)} of sample.steps={s.steps}); "
                              f"lower plan.num_steps or raise plan.window_range")
    _check_range("plan.tau", p.tau, 1)
    _check_range("plan.stride", p.stride, 1)
    _check_range("plan.tau_decay", p.tau_decay, 0, 1, lo_open=True)
    _check_range("plan.tau_min", p.tau_min, 1)
    _check_range("plan.truncate_at", p.truncate_at, 0, 1)
    _check_range("plan.strata", p.strata, 1)
    _check_range("plan.strata_first", p.strata_first, 0)
    if p.kind == "stratified":  # the strata split steps first … hi − 1 (flowpo.plans.Stratified)
        import math

        hi = min(math.floor(p.train_fraction * s.steps + 1e-9), s.steps - 1)
        _check_range("plan.strata_first", p.strata_first, 0, hi - 1)
    _check_range("solver.compression", cfg.solver.compression, 0, 1, lo_open=True)
    if len(cfg.reward.names) == 0:
        raise ConfigError("reward.names=[] is empty; give at least one reward, e.g. reward.names=[digit_alignment]")
    if len(cfg.reward.weights) != len(cfg.reward.names):
        raise ConfigError(
            f"reward.weights={show(cfg.reward.weights)} has {len(cfg.reward.weights)} values for "
            f"{len(cfg.reward.names)} rewards {show(cfg.reward.names)}; give one weight per reward")
    for name, opts in cfg.reward.options.items():
        if name not in cfg.reward.names:
            raise ConfigError(f"reward.options.{show(name)[1:-1]} is set but {show(name)} is not in reward.names="
                              f"{show(cfg.reward.names)}; add it there or drop its options")
        if not isinstance(opts, dict):
            raise ConfigError(f"reward.options.{name}={show(opts)} is not a mapping; set reward.options.{name}.<key>=value")
    _check_range("advantage.eps", cfg.advantage.eps, 0, lo_open=True)
    _check_range("advantage.clip", cfg.advantage.clip, 0, lo_open=True)
    _check_range("advantage.substeps", cfg.advantage.substeps, 1)
    r = cfg.replay
    _check_range("replay.k", r.k, 0, s.group_size - 1)
    _check_range("replay.capacity_per_prompt", r.capacity_per_prompt, 1)
    _check_range("replay.max_age", r.max_age, 1)
    _check_range("replay.decay", r.decay, 0)
    _check_range("replay.is_cap", r.is_cap, 1)
    _check_range("replay.is_sum_clip", r.is_sum_clip, 1)
    _check_range("replay.truncate_at", r.truncate_at, 0, 1)
    _check_range("advantage.estimate_batch_size", cfg.advantage.estimate_batch_size, 1)
    o = cfg.objective
    _check_range("objective.nft_beta", o.nft_beta, 0, lo_open=True)
    _check_range("objective.adv_max", o.adv_max, 0, lo_open=True)
    _check_range("objective.ref_beta", o.ref_beta, 0)
    _check_range("objective.old_ramp", o.old_ramp, 0, 1)
    _check_range("objective.old_max", o.old_max, 0, 1)
    _check_range("objective.anchor_beta", o.anchor_beta, 0)
    _check_range("objective.awm_p", o.awm_p, 0, 1, lo_open=True)
    _check_range("objective.awm_clip", o.awm_clip, 0, lo_open=True)
    if o.kind in CFG_FREE_OBJECTIVES and s.guidance != 1 and not o.allow_cfg:
        raise ConfigError(f"sample.guidance={show(s.guidance)} turns CFG on for objective.kind={o.kind}, a CFG-free "
                          "method; set sample.guidance=1, or objective.allow_cfg=true to train with CFG anyway")
    _check_range("objective.dgpo_beta", o.dgpo_beta, 0, lo_open=True)
    _check_range("objective.dgpo_clip", o.dgpo_clip, 0, lo_open=True)
    _check_range("objective.old_sampling_from", o.old_sampling_from, 0)
    _check_range("objective.dppo_threshold", o.dppo_threshold, 0)
    _check_range("loss.clip_range", cfg.loss.clip_range, 0, lo_open=True)
    _check_range("loss.kl_beta", cfg.loss.kl_beta, 0)
    _check_range("train.iterations", t.iterations, 0)
    _check_range("train.seed", t.seed, 0, SEED_MAX)
    _check_range("train.lr", t.lr, 0, lo_open=True)
    _check_range("train.lr_final", t.lr_final, 0)
    _check_range("train.adam_eps", t.adam_eps, 0)
    _check_range("train.weight_decay", t.weight_decay, 0)
    for i, beta in enumerate(t.betas):  # AdamW's own bounds, named here instead of in torch's words
        if not 0 <= beta < 1:
            raise ConfigError(f"train.betas[{i}]={show(beta)} is out of range; allowed: >= 0 and < 1 "
                              "(e.g. train.betas=[0.9,0.999])")
    _check_range("train.threads", t.threads, 0, THREADS_MAX)
    _check_range("train.lr_horizon", t.lr_horizon, 1)
    _check_range("train.minibatches", t.minibatches, 1, s.prompts_per_iteration * s.group_size)
    _check_range("train.inner_epochs", t.inner_epochs, 1)
    _check_range("train.ema", t.ema, 0, 1)
    _check_range("train.max_grad_norm", t.max_grad_norm, 0, lo_open=True)
    _check_range("train.checkpoint_every", t.checkpoint_every, 0)
    _check_range("train.keep_checkpoints", t.keep_checkpoints, 1)
    _check_range("eval.every", cfg.eval.every, 0)
    _check_range("eval.steps", cfg.eval.steps, 1)
    _check_range("eval.guidance", cfg.eval.guidance, 0)
    _check_range("eval.seed", cfg.eval.seed, 0, SEED_MAX)
    _check_range("eval.prompts", cfg.eval.prompts, 1)
    _check_range("eval.samples_per_prompt", cfg.eval.samples_per_prompt, 1)
    if cfg.model.kind == "embedded" and cfg.model.options:
        raise ConfigError(f"model.options={show(cfg.model.options)} is set but model.kind='embedded' takes none; "
                          "remove model.options (they are a diffusers model kind's own arguments)")
    if cfg.model.kind != "embedded" and not cfg.model.path:
        raise ConfigError(f"model.path is required for model.kind={cfg.model.kind!r}; "
                          "set model.path=/path/to/a/local/diffusers/folder")
