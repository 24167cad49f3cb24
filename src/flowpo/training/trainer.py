"""The one training loop: rollout → rewards → gather → (replay) → advantages → objective updates →
eval/log/checkpoint.

Run:  flowpo train --preset flow_grpo --out runs/x train.iterations=40

Every method is a preset (flowpo.presets) of the parts that `flowpo.build.build` resolves once;
this loop calls the parts and branches on no part's name or flag. Distribution stays at the edges:
rows are split over ranks for rollout, rewards and updates; one gather after the rewards gives every
rank the global batch, on which the advantages and replay selection run as plain functions.
Shapes: B prompts, G per group, N rows, T steps, D latent dims, K rewards.
"""
from __future__ import annotations

import sys
import time
from contextlib import nullcontext as _nullcontext
from pathlib import Path

import torch

from flowpo import config as config_mod
from flowpo.batch import GlobalBatch, UpdateBatch, minibatch_of
from flowpo.build import build
from flowpo.config import Config
from flowpo.errors import ConfigError
from flowpo.policy.base import select_cond
from flowpo.rewards import RewardError
from flowpo.rewards.overlap import ChunkScoring, new_pool
from flowpo.rollout import make_chunks, ode_sample, row_noise, sample, stream_seed as _seed
from flowpo.training import state as train_state
from flowpo.training.distributed import Dist
from flowpo.training.optim import check_grad_norm, lr_at, set_lr
from flowpo.training.runlog import RunLog, write_report


class Trainer:
    def __init__(self, cfg: Config, out: str | Path, *, resume: bool = False):
        self.cfg, self.out = cfg, Path(out)
        self.dist = Dist()
        if resume and cfg.sample.sigmas is None:  # a run from before grids were recorded: its grid was flowpo's
            from flowpo.schedule import sigmas as shifted

            cfg.sample.sigmas = [float(x) for x in shifted(cfg.sample.steps, cfg.sample.shift)]
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        torch.manual_seed(cfg.train.seed)
        self.parts = P = build(cfg, self.dist)
        self.policy, self.device, self.params, self.opt, self.ema = P.policy, P.device, P.params, P.opt, P.ema
        self.sigmas, self.plan, self.rewards = P.sigmas, P.plan, P.rewards
        self._preflight()
        self.progress = train_state.Progress()
        self.state = train_state.TrainState(P, self.progress, self.dist, cfg.train.seed, self.wall)
        self._warned_minibatches, self._zero_adv = False, 0
        self._reward_pool = None  # reward.overlap's scoring worker, kept for the run (flowpo.rewards.overlap)
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        seen = self.dist.all_gather_objects(train_state.has_any_checkpoint(self.out)) if resume else []
        if resume and len(set(seen)) > 1:
            raise FileNotFoundError(f"--resume: ranks {[r for r, x in enumerate(seen) if not x]} see no checkpoint under "
                                    f"{self.out}/checkpoints while others do; put the run folder on a file system "
                                    "every node shares (nothing was changed)")
        if resume and not any(seen):
            if self.dist.is_main:  # killed before its first checkpoint: not a dead end, start it afresh
                print(f"flowpo: --resume: {self.out} has no intact checkpoint yet; starting the run afresh there",
                      file=sys.stderr)
                train_state.clear_run(self.out)
            self.dist.barrier()
            resume = False
        if resume:
            train_state.restore(self.state, self.out)
        elif not self.dist.all_true(not (self.dist.is_main and (self.out / "metrics.jsonl").exists())):
            raise FileExistsError(f"{self.out} already holds a run (metrics.jsonl); use --resume to continue it "
                                  "or choose another --out")
        filled = [k for k, v in (("sample.sigmas", cfg.sample.sigmas), ("train.lr_horizon", cfg.train.lr_horizon))
                  if v is None]
        cfg.sample.sigmas = [float(x) for x in self.sigmas]  # the resolved grid, into config.yaml
        if cfg.train.lr_horizon is None:  # fixed when the run starts; a resumed run reads it back
            cfg.train.lr_horizon = cfg.train.iterations
        cfg.resolved = sorted(set(cfg.resolved) | set(filled))
        if self.dist.is_main:
            config_mod.dump(cfg, self.out / "config.yaml")
        self.log = RunLog(self.out, enabled=self.dist.is_main, tensorboard=cfg.log.tensorboard,
                          wandb=cfg.log.wandb, config=config_mod.to_dict(cfg),
                          purge_step=self.iteration if resume else None)
        self.dist.gather_params()  # FSDP2: keep full weights between optimizer steps (no-op otherwise)
        self.t0 = time.time()

    def _preflight(self) -> None:
        """Score two decoded latents with every reward before anything is written, so a scorer that
        raises or returns NaN/the wrong count fails now, in one line, not after an iteration."""
        with torch.no_grad():
            probe = torch.zeros((2, *self.policy.latent_shape), device=self.device)
            _, detail = self.rewards.score_detail(self.policy.decode(probe), [self.parts.pool[0]] * 2,
                                                  [self.parts.pool.meta[0]] * 2)
        self._detail_keys = sorted(detail)  # the detail fields logged (the same on every rank: same probe)

    iteration = property(lambda self: self.progress.iteration,
                         lambda self, v: setattr(self.progress, "iteration", v))
    nfe = property(lambda self: self.progress.nfe, lambda self, v: setattr(self.progress, "nfe", v))

    @property
    def buffer(self):
        """The OP-GRPO replay buffer (None without replay)."""
        return getattr(self.parts.replay, "buffer", None)

    # ------------------------------------------------------------------ loop
    def run(self) -> dict:
        cfg = self.cfg
        last_eval: dict = {}
        if self.iteration == 0:
            last_eval = self.evaluate()
        bar = None
        if cfg.log.progress and self.dist.is_main:
            from tqdm import tqdm

            bar = tqdm(total=cfg.train.iterations, initial=self.iteration, desc="flowpo", dynamic_ncols=True)
        while self.iteration < cfg.train.iterations:
            rec = self.train_iteration(self.iteration)
            self.iteration += 1
            self.log.write(rec)
            done = self.iteration == cfg.train.iterations
            if done or (cfg.eval.every and self.iteration % cfg.eval.every == 0):
                last_eval = self.evaluate()
            if done or (cfg.train.checkpoint_every and self.iteration % cfg.train.checkpoint_every == 0):
                self.save_checkpoint()
            if bar is not None:
                bar.update(1)
                post = {"reward": f"{rec['reward_mean']:.3f}"}
                if last_eval:
                    post["eval"] = f"{last_eval['eval_reward_mean']:.3f}"
                bar.set_postfix(post)
        if bar is not None:
            bar.close()
        if self._reward_pool is not None:
            self._reward_pool.shutdown(wait=True)
            self._reward_pool = None
        if self.dist.is_main:
            write_report(self.out, title=f"flowpo run: {cfg.preset or 'the defaults (= flow_grpo)'}")
        self.log.close()
        self.dist.barrier()  # nobody leaves (and tears the group down) while rank 0 still writes
        return last_eval

    def wall(self) -> float:
        return self.progress.wall_offset + time.time() - self.t0

    # ------------------------------------------------------------------ one iteration
    def train_iteration(self, it: int) -> dict:
        cfg, s, P, dist = self.cfg, self.cfg.sample, self.parts, self.dist
        t_start = time.time()
        seed = cfg.train.seed
        B, G = s.prompts_per_iteration, s.group_size
        gen = torch.Generator().manual_seed(_seed(seed, it, 1))
        prompt_idx = torch.randint(len(P.pool), (B,), generator=gen)
        heads = P.pool.take(prompt_idx)                                                    # [B] one per group
        g_fresh = P.replay.fresh_counts(it, heads.texts, G, heads.meta)                    # [B] fresh per group
        drawn = P.pool.take(prompt_idx.repeat_interleave(g_fresh))                         # [N] texts + metadata
        prompts_all, meta_all = drawn.texts, drawn.meta
        groups_all = torch.arange(B).repeat_interleave(g_fresh)                             # [N]
        n_all = len(prompts_all)
        plan = self.plan(it, n_all, groups_all, torch.Generator().manual_seed(_seed(seed, it, 2)))
        local = dist.split(n_all)
        rows = list(range(n_all))[local]
        prompts, groups = prompts_all[local], groups_all[local]
        dims, T, dev = self.policy.latent_shape, s.steps, self.device
        init_seeds = [_seed(seed, it, 3, int(groups_all[i]) if s.shared_noise else 10_000 + i) for i in rows]
        x_init = row_noise(init_seeds, dims).to(dev)                                        # [n, *D]
        step_noise = row_noise([_seed(seed, it, 4, i) for i in rows], (T, *dims)).to(dev)  # [n, T, *D]
        cond = self.policy.encode_prompts(prompts)
        # chunks are drawn over the N global rows; each rank runs its part of each (distributed.py)
        g_chunks = make_chunks(n_all, s.batch_size, torch.Generator().manual_seed(_seed(seed, it, 5)))
        chunks, chunk_ids = dist.local_chunks(g_chunks, local, keep_empty=dist.lockstep)
        self.policy.module.eval()
        # under lock-step (sharded FSDP2) every rank must finish the rollout's collectives: no fail-fast
        if cfg.reward.overlap and self._reward_pool is None:
            self._reward_pool = new_pool()
        streamed = ChunkScoring(self.rewards, self.policy.decode, prompts, meta_all[local], len(rows),
                                fail_fast=not dist.lockstep, pool=self._reward_pool) if cfg.reward.overlap else None
        roll, failed = None, None
        try:
            with P.objective.sampling():
                roll = sample(self.policy, cond, self.sigmas, P.spec, x_init=x_init, step_noise=step_noise,
                              sde=plan.sde[local], train=plan.train[local], chunks=chunks, prompts=prompts,
                              group_ids=groups, metadata=meta_all[local],
                              on_chunk=None if streamed is None else streamed.submit)
        except (RewardError, ConfigError) as e:  # an overlapped chunk's scoring failed: the ranks agree in _score
            failed = e
        finally:
            if streamed is not None and roll is None:
                streamed.close()
        t_roll = time.time()
        raw, detail, busy = self._score(roll, prompts, streamed, failed)                    # [n, K]
        t_rew = time.time()
        step_rewards, nfe_it, rec = P.advantage.intermediate(self.policy, roll, self.sigmas, raw)
        nfe_it += roll.nfe
        # the scorers' extra per-sample fields ride along with the rewards (NaN where a call gave none)
        extra = torch.stack([detail.get(k, torch.full((len(rows),), float("nan"))) for k in self._detail_keys], 1) \
            if self._detail_keys else torch.zeros(len(rows), 0)                            # [n, F]
        gb, extra_all = self._gather(roll, raw, step_rewards, meta_all, extra)  # the one gather: global rows
        rep, rstats, rep_nfe = P.replay.select(it, gb)
        adv_all, astats = P.advantage.estimate(gb, P.replay.reward_rows(rep))             # [N+R, T]
        no_signal = not bool((adv_all != 0).any())
        rec["groups/zero_spread"] = _zero_spread_share(gb.raw @ self.rewards.weights, gb.group_ids)
        self._zero_adv = _say_if_no_signal(it, no_signal, gb.raw @ self.rewards.weights, self._zero_adv,
                                           self.dist.is_main)
        batch = UpdateBatch(states=roll.states, final=roll.final, train=roll.train.to(dev),
                            old_log_prob=roll.log_probs.to(dev), adv=adv_all[local].to(dev),
                            weight=torch.ones(len(rows), T, device=dev), cond=roll.cond, chunks=list(roll.chunks),
                            chunk_ids=list(chunk_ids), n_chunks=len(g_chunks), row_ids=torch.tensor(rows))
        batch, wstats = P.replay.extend(batch, rep, adv_all, it, P.objective)
        rec.update({**rstats, **astats, **wstats})
        t_adv = time.time()
        rec.update(self._update(batch))
        rec.update(P.replay.observe(it, gb))
        nfe_tot = dist.all_reduce_sum(torch.tensor([float(nfe_it + rep_nfe)]))
        self.nfe += int(nfe_tot)
        comb_all = gb.raw @ self.rewards.weights
        rec.update({"step": it, "reward_mean": float(comb_all.mean()), "reward_std": float(comb_all.std(unbiased=False)),
                    "reward_min": float(comb_all.min()), "reward_max": float(comb_all.max()),
                    "nfe": self.nfe, "nfe_per_image": float(nfe_tot) / n_all, "wall_s": self.wall(),
                    "time/rollout_s": t_roll - t_start, "time/reward_s": t_rew - t_roll,
                    "time/advantage_s": t_adv - t_rew, "time/update_s": time.time() - t_adv,
                    "time/iteration_s": time.time() - t_start, "plan/trained_steps": float(plan.train.sum()) / n_all,
                    "adv/all_zero": float(no_signal)})
        for k, name in enumerate(self.rewards.names):
            rec[f"reward/{name}"] = float(gb.raw[:, k].mean())
        rec.update({f"reward/{k}": float(extra_all[:, j].nanmean()) for j, k in enumerate(self._detail_keys)})
        if streamed is not None:
            rec["time/reward_busy_s"] = busy
        if plan.window is not None:
            rec["plan/window_start"] = plan.window[0]
        return rec

    def _score(self, roll, prompts: list[str], streamed, err: Exception | None) -> tuple[torch.Tensor, dict, float]:
        """This rank's rewards [n, K] and detail fields (from the overlapped chunks, or all rows at
        once). Ranks agree before anyone raises: a scorer that fails on one rank (a service
        down) stops every rank now, in one line, instead of leaving the others in a collective."""
        raw, detail, busy = None, {}, 0.0
        if err is None:
            t0 = time.perf_counter()
            try:
                if streamed is not None:
                    raw, detail, busy = streamed.result()
                else:
                    raw, detail = self.rewards.score_detail(self.policy.decode(roll.final), prompts, roll.metadata)
                    busy = time.perf_counter() - t0
            except (RewardError, ConfigError) as e:  # ConfigError: e.g. a template field one rank's metadata lacks
                err = e
        if not self.dist.all_true(err is None):
            if err is not None:
                raise err
            raise RewardError(f"rank {self.dist.rank}: a reward failed on another rank (its log has the one-line "
                              "error); every rank stops here; the last checkpoint is intact: fix the reward and "
                              "continue with flowpo train --resume")
        return raw, detail, busy

    def _gather(self, roll, raw: torch.Tensor, step_rewards: torch.Tensor | None, meta_all: list[dict],
                extra: torch.Tensor) -> tuple[GlobalBatch, torch.Tensor]:
        """Every rank's fresh rows, in global order (identity on one process), and the extra
        per-row columns `extra` [n, F] gathered with the rewards; the metadata of all rows is
        known on every rank already."""
        d = self.dist
        g = d.all_gather_cat
        prompts = list(roll.prompts) if d.world == 1 else [p for part in d.all_gather_objects(list(roll.prompts))
                                                            for p in part]
        k = raw.shape[1]
        both = g(torch.cat([raw, extra.to(raw.dtype)], 1))
        gb = GlobalBatch(prompts=prompts, metadata=meta_all, group_ids=g(roll.group_ids), raw=both[:, :k],
                         train=g(roll.train), states=g(roll.states), log_probs=g(roll.log_probs), final=g(roll.final),
                         step_rewards=None if step_rewards is None else g(step_rewards))
        return gb, both[:, k:]

    # ------------------------------------------------------------------ update
    def _update(self, b: UpdateBatch) -> dict:
        cfg, obj = self.cfg, self.parts.objective
        lr = lr_at(cfg.train, self.iteration)
        set_lr(self.opt, lr)
        self.policy.module.train()  # no dropout/batchnorm in any policy: outputs are unchanged
        # a minibatch is a set of whole rollout chunks (so the first ratio is exactly 1), minibatch
        # i = global chunks i, i+mbs, ...: the same rows whatever the number of ranks; at most
        # n_chunks of them, whatever train.minibatches asks for
        mbs = max(1, min(cfg.train.minibatches, b.n_chunks))
        if mbs < cfg.train.minibatches and not self._warned_minibatches and self.dist.is_main:
            self._warned_minibatches = True
            print(f"flowpo: train.minibatches={cfg.train.minibatches} but iteration {self.iteration} has only "
                  f"{b.n_chunks} rollout chunks of <= sample.batch_size={cfg.sample.batch_size} rows, and a minibatch "
                  f"is whole chunks: ran {mbs} minibatches per pass (logged as train/optimizer_steps). Lower "
                  "sample.batch_size for more. (Said once per run.)", file=sys.stderr, flush=True)
        mb_of = [minibatch_of(g, b.n_chunks, cfg.train.minibatches) for g in b.chunk_ids]
        groups = [[c for c, m in zip(b.chunks, mb_of) if m == i] for i in range(mbs)]
        stats, grad_norms = [], []
        probe = lambda: self.policy.velocity(b.states[:1, 0], torch.ones(1, device=b.states.device),  # noqa: E731
                                             select_cond(b.cond, slice(0, 1)), 1.0)
        # minibatch 0 of the first pass runs before any optimizer step: its chunks' old predictions
        # may come from their own forward there (the objectives' begin, replay.PendingPiOld)
        obj.begin(b, self.iteration, first=[j for j, m in enumerate(mb_of) if m == 0])
        for _ in range(cfg.train.inner_epochs):
            for mb in groups:
                count = torch.tensor([float(sum(int(b.train[c].sum()) for c in mb))])
                count = float(self.dist.all_reduce_sum(count))                 # trained (row, step) pairs
                if count == 0:
                    continue
                self.opt.zero_grad(set_to_none=True)
                for idx in mb:
                    with self.dist._guard("fsdp chunk loss") if self.dist.lockstep else _nullcontext():
                        stats += obj.chunk_loss(b, idx, count)
                self.dist.sync_gradients(self.params, probe)                  # Σ over ranks
                grad_norms.append(self.dist.clip_grad_norm(self.params, cfg.train.max_grad_norm))
                check_grad_norm(grad_norms[-1], self.iteration, cfg.model)
                if b.pending is not None and b.pending.left():  # the first step would change π_old's weights
                    raise RuntimeError("replayed rows' π_old was left to a minibatch that runs after the first "
                                       "optimizer step")
                self.opt.step()
                self.dist.gather_params()
                self.ema.update()
        obj.end(self.iteration)
        self.policy.module.eval()
        stats = [st for part in self.dist.all_gather_objects(stats) for st in part]    # all ranks' transitions
        out = obj.merge(stats)
        if grad_norms:
            out["stats/grad_norm"] = sum(grad_norms) / len(grad_norms)
        out["train/lr"] = lr
        out["train/optimizer_steps"] = float(len(grad_norms))
        if b.pending is not None:  # the replayed rows' weight stats, once their π_old is known
            out.update(b.pending.stats(b))
        return out

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out ODE samples of the current weights (the EMA weights when train.ema > 0)."""
        with self.ema.swapped(self.dist.gather_params):  # FSDP2: the gathered copy follows the swap
            rec, images, records = evaluate_policy(self.cfg, self.policy, self.rewards, self.parts.eval_prompts,
                                                   self.parts.eval_sigmas, self.device, self.dist)
        rec.update({"step": self.iteration, "nfe": self.nfe, "wall_s": self.wall()})
        self.log.write(rec)
        self.log.eval_records(self.iteration, records)
        e = self.cfg.eval
        if self.cfg.log.grids and self.dist.is_main:
            n_show = min(len(images), 8 * e.samples_per_prompt * 2)
            self.log.grid(images[:n_show], f"eval_{self.iteration:06d}", nrow=max(8, e.samples_per_prompt * 4),
                          labels=[r["prompt"] for r in records[:n_show]], rewards=[r["reward"] for r in records[:n_show]])
        return rec

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> None:
        train_state.save(self.state, self.out, self.cfg.train.keep_checkpoints)


def _zero_spread_share(combined: torch.Tensor, group_ids: torch.Tensor) -> float:
    """Share of the iteration's groups whose fresh rewards are all equal (no GRPO signal from them)."""
    ids = torch.unique(group_ids)
    flat = [float(combined[group_ids == g].std(unbiased=False)) < 1e-6 for g in ids.tolist()]
    return sum(flat) / max(1, len(flat))


def _say_if_no_signal(it: int, no_signal: bool, combined: torch.Tensor, count: int, main: bool) -> int:
    """Say so (the first 3 times; always logged as adv/all_zero) when every advantage of an
    iteration is 0: a reward constant over the batch (or within every group) teaches nothing.
    Returns the updated count of such iterations."""
    if not no_signal:
        return count
    count += 1
    if count <= 3 and main:
        vals = combined.unique()
        what = f"constant at {float(vals[0]):.4g}" if vals.numel() == 1 else "constant within every group"
        print(f"flowpo: iteration {it}: every advantage is 0 (the reward is {what}); nothing is learned from it: "
              "check the reward (reward.names, its scale) or the prompts"
              + (" (said 3 times; later ones are logged as adv/all_zero)" if count == 3 else ""),
              file=sys.stderr, flush=True)
    return count


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
    x0, _ = ode_sample(policy, policy.encode_prompts(prompts), eval_sigmas, x_init, g, cfg.sample.batch_size)
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


def train(cfg: Config, out: str | Path, *, resume: bool = False) -> dict:
    return Trainer(cfg, out, resume=resume).run()
