"""Evaluation: deterministic samples of held-out prompts, scored, split over the ranks."""
from __future__ import annotations

import torch

from flowpo.config import Config
from flowpo.policy.edit import encode_rows
from flowpo.rollout import ode_sample, row_noise, stream_seed as _seed
from flowpo.training.distributed import Dist


@torch.no_grad()
def evaluate_policy(cfg: Config, policy, rewards, eval_prompts, eval_sigmas: torch.Tensor,
                    device, dist=None) -> tuple[dict, torch.Tensor, list[dict]]:
    """Score deterministic Euler samples of `eval.samples_per_prompt` per held-out prompt (a
    flowpo.prompts.PromptSet), from the fixed noise of `eval.seed`, split over the ranks of `dist`
    → (metrics, this rank's images, one record per sample: prompt, metadata, rewards).

    Metrics: eval_reward_mean/std, eval/<reward>, and eval_tag/<tag> (the mean combined reward
    per metadata `tag`, GenEval's categories) when the prompts carry tags."""
    from flowpo.prompts import PromptSet

    dist = dist or Dist()
    e = cfg.eval
    g = e.guidance if e.guidance is not None else cfg.sample.guidance
    held = eval_prompts if isinstance(eval_prompts, PromptSet) else PromptSet(list(eval_prompts))
    every = held.take([i for i in range(len(held)) for _ in range(e.samples_per_prompt)])
    n_all = len(every)
    local = dist.split(n_all)                                  # ranks may hold one row more or less
    rows = list(range(n_all))[local]
    prompts, metas = every.texts[local], every.meta[local]
    x_init = row_noise([_seed(e.seed, i) for i in rows], policy.latent_shape).to(device)
    policy.module.eval()
    x0, _ = ode_sample(policy, encode_rows(policy, prompts, metas), eval_sigmas, x_init, g, cfg.sample.batch_size)
    images = policy.decode(x0)
    raw = dist.all_gather_cat(rewards.score(images, prompts, metas))                    # [n_all, K]
    comb = raw @ rewards.weights
    rec = {"eval_reward_mean": float(comb.mean()), "eval_reward_std": float(comb.std(unbiased=False))}
    for k, name in enumerate(rewards.names):
        rec[f"eval/{name}"] = float(raw[:, k].mean())
    tags: dict[str, list[float]] = {}
    for m, c in zip(every.meta, comb.tolist()):
        if isinstance(m.get("tag"), str):
            tags.setdefault(m["tag"], []).append(c)
    for tag, vals in sorted(tags.items()):
        rec[f"eval_tag/{tag}"] = sum(vals) / len(vals)
    records = [{"prompt": p, "metadata": m, "sample": i % e.samples_per_prompt, "reward": c,
                **{name: float(raw[i, k]) for k, name in enumerate(rewards.names)}}
               for i, (p, m, c) in enumerate(zip(every.texts, every.meta, comb.tolist()))]
    return rec, images, records
