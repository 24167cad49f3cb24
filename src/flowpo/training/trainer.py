"""The one training loop: rollout → rewards → gather → replay → advantages → updates → log.

Run:  flowpo train --preset flow_grpo --out runs/x train.iterations=40

Every method is a preset (flowpo.presets) of the parts that `flowpo.build.build` resolves once;
this loop calls the parts and branches on no part's name or flag (absent parts are null objects).
One `flowpo.trajectory.Trajectory` carries the rows from the rollout to the loss. Distribution
stays at the edges: rows are split over ranks for rollout, rewards and updates; one gather after
the rewards gives every rank the global rows, on which replay and the advantages run as plain
functions; lock-step (FSDP2) lives in the policy wrapper (flowpo.lockstep).
Shapes: B prompts, G per group, N rows, T steps, D latent dims, K rewards.
"""
from __future__ import annotations

import sys
import time
from functools import partial
from pathlib import Path

import torch

from flowpo import config as config_mod
from flowpo.build import build
from flowpo.config import Config
from flowpo.errors import ConfigError
from flowpo.groups import flat_share
from flowpo.lockstep import is_lockstep
from flowpo.parts import resolve_threads
from flowpo.policy.edit import encode_rows
from flowpo.rewards import RewardError
from flowpo.stats import merge
from flowpo.trajectory import gather, host_steps, minibatch_of, update_rows
from flowpo.training import state as train_state
from flowpo.training.distributed import Dist
from flowpo.training.evaluate import evaluate_policy
from flowpo.training.optim import check_grad_norm, lr_at, set_lr
from flowpo.training.runlog import RunLog, progress_bar, write_report


class Trainer:
    def __init__(self, cfg: Config, out: str | Path, *, resume: bool = False):
        self.cfg, self.out = cfg, Path(out)
        self.dist = Dist()
        if resume and cfg.sample.sigmas is None:  # a run from before grids were recorded: its grid was flowpo's
            from flowpo.schedule import sigmas as shifted

            cfg.sample.sigmas = [float(x) for x in shifted(cfg.sample.steps, cfg.sample.shift)]
        torch.set_num_threads(resolve_threads(cfg.train.threads))
        torch.manual_seed(cfg.train.seed)
        self.parts = P = build(cfg, self.dist)
        self.policy, self.device, self.params, self.opt, self.ema = P.policy, P.device, P.params, P.opt, P.ema
        self.sigmas, self.rewards = P.sigmas, P.rewards
        P.scoring.preflight(self.policy, self.device, P.pool[0], P.pool.meta[0])
        self.progress = train_state.Progress()
        self.state = train_state.TrainState(P, self.progress, self.dist, cfg.train.seed, self.wall)
        self._warned_minibatches, self._zero_adv = False, 0
        resume = train_state.open_run(self.state, self.out, resume)
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
        self.t0 = time.time()

    iteration = property(lambda self: self.progress.iteration,
                         lambda self, v: setattr(self.progress, "iteration", v))
    nfe = property(lambda self: self.progress.nfe, lambda self, v: setattr(self.progress, "nfe", v))

    # ------------------------------------------------------------------ loop
    def run(self) -> dict:
        cfg = self.cfg
        last_eval: dict = {}
        if self.iteration == 0:
            last_eval = self.evaluate()
        bar = progress_bar(cfg.log.progress and self.dist.is_main, cfg.train.iterations, self.iteration)
        while self.iteration < cfg.train.iterations:
            rec = self.train_iteration(self.iteration)
            self.iteration += 1
            self.log.write(rec)
            done = self.iteration == cfg.train.iterations
            if done or (cfg.eval.every and self.iteration % cfg.eval.every == 0):
                last_eval = self.evaluate()
            if done or (cfg.train.checkpoint_every and self.iteration % cfg.train.checkpoint_every == 0):
                self.save_checkpoint()
            bar.update(1)
            bar.set_postfix({"reward": f"{rec['reward_mean']:.3f}",
                             **({"eval": f"{last_eval['eval_reward_mean']:.3f}"} if last_eval else {})})
        bar.close()
        self.parts.scoring.close()
        if self.dist.is_main:
            write_report(self.out, title=f"flowpo run: {cfg.preset or 'the defaults (= flow_grpo)'}")
        self.log.close()
        self.dist.barrier()  # nobody leaves (and tears the group down) while rank 0 still writes
        return last_eval

    def wall(self) -> float:
        return self.progress.wall_offset + time.time() - self.t0

    # ------------------------------------------------------------------ one iteration
    def train_iteration(self, it: int) -> dict:
        P, dist, t0 = self.parts, self.dist, time.time()
        heads = P.rollout.heads(it)                                                # [B] one prompt per group
        mine, rec = P.rollout.rows(it, heads, P.replay.fresh_counts(it, heads, self.cfg.sample.group_size))
        mine, nfe, busy, t_roll = self._sample_and_score(it, mine)                 # this rank's rows, scored
        t_rew = time.time()
        step_rewards, nfe_steps, srec = P.advantage.intermediate(self.policy, mine, self.sigmas)
        mine = mine.replace(step_rewards=step_rewards)                             # [n, T+1, K] or None
        fresh = gather(mine, dist)                                                 # all ranks' rows, global order
        rows, rrec, nfe_replay = P.replay.extend(it, fresh)                        # + replayed rows [N+R]
        adv, arec = P.advantage.estimate(rows)                                     # [N+R, T]
        rows = rows.replace(adv=adv)
        batch = update_rows(mine, rows, fresh.n, dist, partial(encode_rows, self.policy),
                             self.cfg.sample.batch_size)
        t_adv = time.time()
        rec.update({**srec, **rrec, **arec, **self._update(batch), **P.replay.observe(it, fresh)})
        nfe_all = float(dist.all_reduce_sum(torch.tensor([float(nfe + nfe_steps + nfe_replay)])))
        self.nfe += int(nfe_all)
        comb = self.rewards.combine(fresh.raw)
        no_signal = not bool((adv != 0).any())
        self._zero_adv = _say_if_no_signal(it, no_signal, comb, self._zero_adv, dist.is_main)
        rec.update({**P.scoring.stats(fresh), "groups/zero_spread": flat_share(comb, fresh.group_ids),
                    "step": it, "nfe": self.nfe, "nfe_per_image": nfe_all / fresh.n, "wall_s": self.wall(),
                    "time/rollout_s": t_roll - t0, "time/reward_s": t_rew - t_roll, "time/reward_busy_s": busy,
                    "time/advantage_s": t_adv - t_rew, "time/update_s": time.time() - t_adv,
                    "time/iteration_s": time.time() - t0, "adv/all_zero": float(no_signal)})
        return rec

    def _sample_and_score(self, it: int, mine):
        """Sample this rank's rows and score them (reward.overlap: while sampling) → (rows with
        raw rewards and detail, nfe, seconds scoring, the time sampling ended). Ranks agree before
        anyone raises: a scorer failing on one rank (a service down) stops every rank now, in one
        line, instead of leaving the others in a collective."""
        session, err, out = self.parts.scoring.open(mine.prompts, mine.metadata), None, None
        t_roll = time.time()
        try:
            traj, nfe = self.parts.rollout.sample(it, mine, session.on_chunk)
            t_roll = time.time()
            raw, detail, busy = session.result(traj.final)                        # [n, K], [n, F]
            out = traj.replace(raw=raw, detail=detail), nfe, busy, t_roll
        except (RewardError, ConfigError) as e:  # ConfigError: e.g. a template field one rank's metadata lacks
            err = e
        finally:
            session.close()
        if not self.dist.all_true(err is None):
            if err is not None:
                raise err
            raise RewardError(f"rank {self.dist.rank}: a reward failed on another rank (its log has the one-line "
                              "error); every rank stops here; the last checkpoint is intact: fix the reward and "
                              "continue with flowpo train --resume")
        return out

    # ------------------------------------------------------------------ update
    def _update(self, b) -> dict:
        """train.inner_epochs passes over b's chunks in minibatches of whole chunks: minibatch i =
        global chunks i, i + mbs, … (the same rows whatever the number of ranks, so the first
        ratio is exactly 1), one optimizer step each."""
        cfg, obj, dist = self.cfg, self.parts.objective, self.dist
        lr = lr_at(cfg.train, self.iteration)
        set_lr(self.opt, lr)
        self.policy.module.train()  # no dropout/batchnorm in any policy: outputs are unchanged
        mbs = self._minibatches(b.chunks.total)
        mb_all = [minibatch_of(g, b.chunks.total, cfg.train.minibatches) for g in range(b.chunks.total)]
        mb_of = [mb_all[g] for g in b.chunks.ids]                                 # this rank's chunks
        groups = [[c for c, m in zip(b.chunks.rows, mb_of) if m == i] for i in range(mbs)]
        b, every = host_steps(b, dist, is_lockstep(self.policy))                  # the loop's one device→host copy
        counts = [float(sum(sum(c) for c, m in zip(every, mb_all) if m == i)) for i in range(mbs)]  # all ranks' pairs
        obj.begin(b, self.iteration, first=[j for j, m in enumerate(mb_of) if m == 0])
        stats, norms = [], []
        for _ in range(cfg.train.inner_epochs):
            for mb, count in zip(groups, counts):
                if count == 0:
                    continue
                self.opt.zero_grad(set_to_none=True)
                for idx in mb:
                    with dist.collective("fsdp chunk loss"):
                        stats += obj.chunk_loss(b, idx, count)
                dist.sync_gradients(self.params)                                    # Σ over ranks
                norms.append(dist.clip_grad_norm(self.params, cfg.train.max_grad_norm))
                check_grad_norm(norms[-1], self.iteration, cfg.model)
                self.opt.step()
                self.ema.update()
                b = b.replace(uncond=None)  # the weights moved: CFG's rollout outputs are stale (flowpo.guided)
        out = {**merge(obj.Stats, stats, dist), **obj.end(self.iteration), "train/lr": lr,
               "train/optimizer_steps": float(len(norms))}
        self.policy.module.eval()
        if norms:
            out["stats/grad_norm"] = sum(norms) / len(norms)
        return out

    def _minibatches(self, n_chunks: int) -> int:
        """Minibatches per pass: train.minibatches, at most one per chunk (said once per run)."""
        cfg = self.cfg
        mbs = max(1, min(cfg.train.minibatches, n_chunks))
        if mbs < cfg.train.minibatches and not self._warned_minibatches and self.dist.is_main:
            self._warned_minibatches = True
            print(f"flowpo: train.minibatches={cfg.train.minibatches} but iteration {self.iteration} has only "
                  f"{n_chunks} rollout chunks of <= sample.batch_size={cfg.sample.batch_size} rows, and a minibatch "
                  f"is whole chunks: ran {mbs} minibatches per pass (logged as train/optimizer_steps). Lower "
                  "sample.batch_size for more. (Said once per run.)", file=sys.stderr, flush=True)
        return mbs

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out ODE samples of the current weights (the EMA weights when train.ema > 0)."""
        with self.ema.swapped():
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

    def save_checkpoint(self) -> None:
        train_state.save(self.state, self.out, self.cfg.train.keep_checkpoints)


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


def train(cfg: Config, out: str | Path, *, resume: bool = False) -> dict:
    return Trainer(cfg, out, resume=resume).run()
