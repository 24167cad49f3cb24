"""The one builder: a run config resolved into part objects, once (DESIGN.md, STYLE.md guideline 1).

Each part has a registry that is the only list of its names (the config's allowed values come
from it, flowpo.config.CHOICES):

| part | config | registry |
|---|---|---|
| policy | model.* | flowpo.policy.registry (+ the embedded model) |
| schedule | sample.steps, sample.sigmas, sample.shift | flowpo.schedule.resolve (the policy's own grid) |
| kernel | sample.kernel | flowpo.sde.KERNELS |
| tail solver | solver.* | flowpo.solvers.TAILS |
| plan | plan.* | flowpo.plans.PLANS |
| rollout | sample.* | flowpo.rollout.Rollout (seeds, plan, chunks; RolloutSpec: kernel, tail) |
| rewards | reward.* | flowpo.rewards |
| scoring | reward.overlap | flowpo.rewards.overlap (batch or overlapped) |
| advantage | advantage.* | flowpo.advantages.ESTIMATORS |
| replay | replay.* | flowpo.replay (k = 0: NoReplay) |
| objective | objective.*, loss.* | flowpo.objectives.OBJECTIVES |
| optimizer + lr schedule | train.* | flowpo.training.optim |
| EMA | train.ema | flowpo.ema |

The trainer gets a `Parts` and calls the parts; it branches on no part's name or flag: every
choice (overlapped scoring, lock-step ranks, replay or none, EMA or none) is made here, as an object
or a null object.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from flowpo.config import Config


@dataclass
class Parts:
    policy: object
    device: torch.device
    params: list
    sigmas: torch.Tensor          # [T+1] training grid
    eval_sigmas: torch.Tensor     # [T_eval+1]
    rollout: object               # flowpo.rollout.Rollout (seeds, plan, chunks, kernel, tail solver)
    plan: object                  # flowpo.plans.Plan (the rollout's; checkpointed)
    rewards: object               # flowpo.rewards.RewardSet
    scoring: object               # flowpo.rewards.overlap.BatchScoring / OverlapScoring
    advantage: object             # an estimator of flowpo.advantages.ESTIMATORS
    replay: object                # flowpo.replay.NoReplay / OPReplay
    objective: object             # an objective of flowpo.objectives.OBJECTIVES
    opt: torch.optim.Optimizer
    ema: object                   # flowpo.ema.EMA (train.ema > 0) or NoEMA
    pool: object                  # flowpo.prompts.PromptSet: training prompts and their metadata
    eval_prompts: object          # flowpo.prompts.PromptSet


def build(cfg: Config, dist) -> Parts:
    """Every part of a training run. `dist` is the run's flowpo.training.distributed.Dist (the
    policy's module is wrapped for it before the optimizer is built)."""
    from flowpo.advantages import ESTIMATORS
    from flowpo.guided import GuidedVelocity
    from flowpo.objectives import Context, build_objective
    from flowpo.parts import build_plan, build_policy, eval_prompts, resolve_device, train_prompt_pool
    from flowpo.policy.edit import check_layouts, check_sources
    from flowpo.replay import build_replay
    from flowpo.rewards import RewardSet
    from flowpo.rewards.overlap import build_scoring
    from flowpo.rollout import Rollout, RolloutSpec
    from flowpo import schedule
    from flowpo.sde import KERNELS
    from flowpo.solvers import TAILS
    from flowpo.ema import build_ema
    from flowpo.training.optim import build_optimizer

    s = cfg.sample
    # inputs first (prompt files, reward options and models): a bad path fails before the policy loads
    pool, held_out = train_prompt_pool(cfg), eval_prompts(cfg)
    check_sources(cfg.model.kind, pool, "sample.prompts_file")   # an editing model needs source images
    check_sources(cfg.model.kind, held_out, "eval.prompts_file")
    rewards = RewardSet(cfg.reward.names, cfg.reward.weights, cfg.reward.options)
    policy = build_policy(cfg.model)
    device = resolve_device(cfg.model.device)
    check_layouts(policy, [("sample.prompts_file", pool), ("eval.prompts_file", held_out)])
    # LoRA: broadcast rank 0's weights; full: FSDP2-shard block by block, the frozen reference too
    # (params become DTensors), and lock-step the model calls of all ranks — distributed.py
    dist.wrap(policy.module, policy.trainable_parameters(), full=cfg.model.mode == "full",
              frozen=[getattr(policy, "reference_module", None)])
    if cfg.model.compile:  # after the wrap: FSDP2's hooks sit on the blocks, the compiled code inside them
        from flowpo.regional import compile_blocks

        compile_blocks(policy.module)
    if dist.lockstep:
        from flowpo.lockstep import LockstepPolicy

        policy = LockstepPolicy(policy, dist)
    params = policy.trainable_parameters()
    opt = build_optimizer(params, cfg.train)
    ema = build_ema(params, cfg.train.ema)
    sigmas = schedule.resolve(s.sigmas, policy, s.steps, s.shift)   # sample.sigmas, else the policy's own
    kernel = KERNELS[s.kernel]
    guided = GuidedVelocity(policy, s.guidance, cfg.model.cfg_uncond, cfg.model.cfg_grad)
    spec = RolloutSpec(kernel=kernel, noise_level=s.noise_level, guidance=s.guidance, reduction=s.reduction,
                       tail=TAILS[cfg.solver.kind](cfg), guided=guided, grid=cfg.solver.grid,
                       history=cfg.solver.grid == "dpm2m" or (cfg.solver.warm_start and cfg.solver.kind == "dpm2m"))
    ctx = Context(policy=policy, sigmas=sigmas, kernel=kernel, guidance=s.guidance, noise_level=s.noise_level,
                  reduction=s.reduction, seed=cfg.train.seed, params=params, guided=guided,
                  reduce_sum=dist.all_reduce_sum)
    objective, plan = build_objective(cfg.objective.kind, ctx, cfg), build_plan(cfg, sigmas)
    guided.for_objective(objective)
    rollout = Rollout(policy, sigmas, spec, plan, pool, s, cfg.train.seed, dist, device, objective.sampling)
    return Parts(policy=policy, device=device, params=params, sigmas=sigmas,
                 eval_sigmas=policy.sigmas(cfg.eval.steps, s.shift), rollout=rollout, plan=plan, rewards=rewards,
                 scoring=build_scoring(cfg.reward.overlap, rewards, policy.decode, dist.lockstep),
                 advantage=ESTIMATORS[cfg.advantage.kind](cfg, rewards),
                 replay=build_replay(cfg, sigmas, policy, rewards, dist, device),
                 objective=objective, opt=opt, ema=ema, pool=pool, eval_prompts=held_out)
