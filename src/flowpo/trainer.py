"""The one training loop: rollout → rewards → advantages → (replay) → clipped updates → eval/log/ckpt.

Run:  flowpo train --preset flow_grpo --out runs/x train.iterations=40

Every method is a preset (flowpo.presets) that sets the parts below; this loop never branches on a
method's name. Shapes: B prompts, G per group, N rows, T steps, D latent dims, K rewards.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from flowpo import config as config_mod, resume
from flowpo.advantages import aggregate_advantages, aggregate_stepwise_advantages
from flowpo.buffer import ReplayBuffer, importance_weights, regenerate_tails
from flowpo.config import Config
from flowpo.distributed import Dist
from flowpo.ema import EMA
from flowpo.loss import clipped_surrogate, mean_kl, merge_stats
from flowpo.optim import build_optimizer, check_grad_norm, lr_at, set_lr
from flowpo.parts import build_plan, build_policy, eval_prompts, resolve_device, train_prompt_pool
from flowpo.policy.base import cat_cond, select_cond
from flowpo.rewards import RewardSet
from flowpo.rollout import make_chunks, ode_sample, row_noise, sample
from flowpo.runlog import RunLog, write_report
from flowpo.schedule import sigmas as make_sigmas
from flowpo.sde import KERNELS
from flowpo.stepwise import intermediate_rewards


def _seed(*parts: int) -> int:
    """Deterministic 63-bit seed from integers (so every stream is a function of seed, iteration, row)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


@dataclass
class UpdateBatch:
    """Everything the update re-scores. M rows (fresh then replayed)."""

    states: torch.Tensor       # [M, T+1, *D]
    train: torch.Tensor        # [M, T] bool
    old_log_prob: torch.Tensor  # [M, T] π_old
    adv: torch.Tensor          # [M, T]
    weight: torch.Tensor       # [M, T] detached importance weights (1 for fresh rows)
    cond: dict                 # rows [M, ...]
    chunks: list[torch.Tensor]  # row indices; fresh chunks equal the rollout's
    chunk_ids: list[int] | None = None  # global chunk index of each chunk (None: its position)
    n_chunks: int = 0                   # global chunks (fresh + replayed) over all ranks


class Trainer:
    def __init__(self, cfg: Config, out: str | Path, *, resume: bool = False):
        self.cfg, self.out = cfg, Path(out)
        self.dist = Dist()
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        torch.manual_seed(cfg.train.seed)
        self.policy = build_policy(cfg.model)
        self.device = resolve_device(cfg.model.device)
        # LoRA: broadcast rank 0's weights; full: FSDP2-shard (params become DTensors) — distributed.py
        self.dist.wrap(self.policy.module, self.policy.trainable_parameters(), full=cfg.model.mode == "full")
        self.params = self.policy.trainable_parameters()
        self.opt = build_optimizer(self.params, cfg.train)
        self.ema = EMA(self.params, cfg.train.ema) if cfg.train.ema > 0 else None
        self.rewards = RewardSet(cfg.reward.names, cfg.reward.weights)
        s = cfg.sample
        self.sigmas = make_sigmas(s.steps, s.shift)                      # [T+1]
        self.eval_sigmas = make_sigmas(cfg.eval.steps, s.shift)
        self.kernel = KERNELS[s.kernel]
        self.plan = build_plan(cfg, self.sigmas)
        self.pool = train_prompt_pool(cfg)
        self.eval_prompts = eval_prompts(cfg)
        r = cfg.replay
        self.buffer = ReplayBuffer(self.sigmas, capacity_per_prompt=r.capacity_per_prompt, max_age=r.max_age,
                                   decay=r.decay, truncate_sigma=r.truncate_sigma,
                                   truncate_fraction=r.truncate_fraction) if r.enabled and r.k > 0 else None
        self.iteration, self.nfe, self.wall_offset = 0, 0, 0.0
        self._warned_minibatches = False
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        if resume:
            self._load_checkpoint()
        elif not self.dist.all_true(not (self.dist.is_main and (self.out / "metrics.jsonl").exists())):
            raise FileExistsError(f"{self.out} already holds a run (metrics.jsonl); use --resume to continue it "
                                  "or choose another --out")
        if self.dist.is_main:
            config_mod.dump(cfg, self.out / "config.yaml")
        self.log = RunLog(self.out, enabled=self.dist.is_main, tensorboard=cfg.log.tensorboard,
                          wandb=cfg.log.wandb, config=config_mod.to_dict(cfg))
        self.dist.gather_params()  # FSDP2: keep full weights between optimizer steps (no-op otherwise)
        self.t0 = time.time()

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
        if self.dist.is_main:
            write_report(self.out, title=f"flowpo run: {cfg.preset or 'custom'}")
        self.log.close()
        self.dist.barrier()  # nobody leaves (and tears the group down) while rank 0 still writes
        return last_eval

    def wall(self) -> float:
        return self.wall_offset + time.time() - self.t0

    # ------------------------------------------------------------------ one iteration
    def train_iteration(self, it: int) -> dict:
        cfg, s = self.cfg, self.cfg.sample
        t_start = time.time()
        seed = cfg.train.seed
        B, G = s.prompts_per_iteration, s.group_size
        k_replay = cfg.replay.k if self.buffer is not None else 0
        g_fresh = G - k_replay
        gen = torch.Generator().manual_seed(_seed(seed, it, 1))
        prompt_idx = torch.randint(len(self.pool), (B,), generator=gen)
        prompts_all = [self.pool[int(i)] for i in prompt_idx for _ in range(g_fresh)]     # [N]
        groups_all = torch.arange(B).repeat_interleave(g_fresh)                             # [N]
        n_all = len(prompts_all)
        plan = self.plan(it, n_all, groups_all, torch.Generator().manual_seed(_seed(seed, it, 2)))
        local = self.dist.split(n_all)
        rows = list(range(n_all))[local]
        prompts, groups = prompts_all[local], groups_all[local]
        dims = self.policy.latent_shape
        T = s.steps
        init_seeds = [_seed(seed, it, 3, int(groups_all[i]) if s.shared_noise else 10_000 + i) for i in rows]
        dev = self.device
        x_init = row_noise(init_seeds, dims).to(dev)                                        # [n, *D]
        step_noise = row_noise([_seed(seed, it, 4, i) for i in rows], (T, *dims)).to(dev)  # [n, T, *D]
        cond = self.policy.encode_prompts(prompts)
        # chunks are drawn over the N global rows; each rank runs its part of each (distributed.py)
        g_chunks = make_chunks(n_all, s.batch_size, torch.Generator().manual_seed(_seed(seed, it, 5)))
        chunks, chunk_ids = self.dist.local_chunks(g_chunks, local)
        self.policy.module.eval()
        roll = sample(self.policy, cond, self.sigmas, x_init=x_init, step_noise=step_noise,
                      sde=plan.sde[local], train=plan.train[local], kernel=s.kernel, noise_level=s.noise_level,
                      guidance=s.guidance, chunks=chunks,
                      reduction=s.reduction, solver=cfg.solver.kind, compression=cfg.solver.compression,
                      shift=s.shift, prompts=prompts, group_ids=groups)
        roll.extras.update(chunk_ids=chunk_ids, n_chunks=len(g_chunks))
        t_roll = time.time()
        images = self.policy.decode(roll.final)
        raw = self.rewards.score(images, prompts)                                           # [n, K]
        combined = self.rewards.combine(raw)                                                # [n]
        t_rew = time.time()
        rec: dict = {}
        nfe_it = roll.nfe
        step_rewards = None
        if cfg.advantage.kind == "stepwise":
            step_rewards, _, extra = intermediate_rewards(
                self.policy, roll.states, roll.train, self.sigmas, cond, prompts, raw, self.rewards.score,
                substeps=cfg.advantage.substeps, guidance=s.guidance, batch_size=max(4 * s.batch_size, 256))
            nfe_it += extra
            rec["stepwise/nfe"] = extra
        batch, rstats = self._assemble(it, roll, raw, combined, step_rewards)
        rec.update(rstats)
        if self.dist.is_main:  # every rank regenerates the same replayed tails; count them once
            nfe_it += rstats.get("replay/regenerate_nfe", 0)
        t_adv = time.time()
        rec.update(self._update(batch))
        if self.buffer is not None:
            self.buffer.expire(it + 1)
            # every rank adds all N global rows, in global order, so all ranks hold the same buffer
            g = self.dist.all_gather_cat
            self.buffer.add(it, self._gather_prompts(prompts), g(roll.states), g(roll.train), g(roll.log_probs),
                            g(combined), g(raw), None if step_rewards is None else g(step_rewards))
            rec.update({"replay/entries": len(self.buffer), "replay/bytes": self.buffer.nbytes,
                        "replay/bytes_per_trajectory": self.buffer.nbytes / max(1, len(self.buffer))})
        nfe_tot = self.dist.all_reduce_sum(torch.tensor([float(nfe_it)]))
        self.nfe += int(nfe_tot)
        raw_all = self.dist.all_gather_cat(raw)
        comb_all = raw_all @ self.rewards.weights
        rec.update({"step": it, "reward_mean": float(comb_all.mean()), "reward_std": float(comb_all.std(unbiased=False)),
                    "nfe": self.nfe, "nfe_per_image": float(nfe_tot) / n_all, "wall_s": self.wall(),
                    "time/rollout_s": t_roll - t_start, "time/reward_s": t_rew - t_roll,
                    "time/advantage_s": t_adv - t_rew, "time/update_s": time.time() - t_adv,
                    "time/iteration_s": time.time() - t_start, "plan/trained_steps": float(plan.train.sum()) / n_all})
        for k, name in enumerate(self.rewards.names):
            rec[f"reward/{name}"] = float(raw_all[:, k].mean())
        if plan.window is not None:
            rec["plan/window_start"] = plan.window[0]
        return rec

    # ------------------------------------------------------------------ advantages + replay mixing
    def _assemble(self, it: int, roll, raw: torch.Tensor, combined: torch.Tensor,
                  step_rewards: torch.Tensor | None) -> tuple[UpdateBatch, dict]:
        cfg = self.cfg
        T = cfg.sample.steps
        n = roll.states.shape[0]
        rec: dict = {}
        # replayed rows (OP-GRPO): chosen per group from the buffer, before this iteration's samples go in
        rep = []
        if self.buffer is not None:
            rep = self.buffer.select(it, self._gather_prompts(roll.prompts), self.dist.all_gather_cat(roll.group_ids),
                                     self.dist.all_gather_cat(combined), k=cfg.replay.k, rule=cfg.replay.rule)
            rec["replay/admitted"] = len(rep)
            if rep and cfg.replay.tail == "regenerate":
                raw_rep, extra = regenerate_tails(self.policy, [e for _, e in rep], self.sigmas,
                                                  guidance=cfg.sample.guidance, batch_size=cfg.sample.batch_size,
                                                  score=self.rewards.score, device=self.device)
                rep = [(g, dataclasses.replace(e, reward_raw=raw_rep[i])) for i, (g, e) in enumerate(rep)]
                rec["replay/regenerate_nfe"] = extra
        # rewards of all rows (fresh of every rank, then replayed) for group statistics
        raw_all = self.dist.all_gather_cat(raw)
        groups_all = self.dist.all_gather_cat(roll.group_ids)
        if rep:
            raw_all = torch.cat([raw_all, torch.stack([e.reward_raw for _, e in rep])])
            groups_all = torch.cat([groups_all, torch.tensor([g for g, _ in rep])])
        adv_cfg = cfg.advantage
        local = self.dist.split(n * self.dist.world)
        if adv_cfg.kind == "stepwise":
            sr_all = self.dist.all_gather_cat(step_rewards)                                # [N, T+1, K]
            K = sr_all.shape[2]
            valid_all = self.dist.all_gather_cat(roll.train).cpu()
            if rep:
                sr_all = torch.cat([sr_all, torch.stack([e.step_rewards if e.step_rewards is not None
                                                         else torch.zeros(T + 1, K) for _, e in rep])])
                valid_all = torch.cat([valid_all, torch.stack([self._row_mask(e) for _, e in rep])])
            adv_all = aggregate_stepwise_advantages(
                sr_all, self.rewards.weights, groups_all, aggregation=cfg.reward.aggregation,
                normalize=adv_cfg.normalize, eps=adv_cfg.eps, clip=adv_cfg.clip, valid=valid_all,
                std=adv_cfg.gain_std)                                                        # [N+R, T]
            sr_comb = sr_all @ self.rewards.weights.to(sr_all)
            gains = (sr_comb[:, 1:] - sr_comb[:, :-1]).abs() * valid_all
            rec["stepwise/mean_abs_gain_by_step"] = [round(float(x), 5) for x in
                                                     (gains.sum(0) / valid_all.sum(0).clamp_min(1))]
        else:
            adv_all = aggregate_advantages(raw_all, self.rewards.weights, groups_all,
                                           aggregation=cfg.reward.aggregation, std=adv_cfg.std,
                                           eps=adv_cfg.eps, clip=adv_cfg.clip)[:, None].expand(-1, T)
        adv = adv_all[local]
        states, train, old, weight, cond = roll.states, roll.train, roll.log_probs, torch.ones(n, T, device=roll.states.device), roll.cond
        chunks = list(roll.chunks)
        chunk_ids = list(roll.extras.get("chunk_ids", range(len(chunks))))
        n_chunks = roll.extras.get("n_chunks", len(chunks))
        # replayed rows: global chunks of their own (exact π_old recompute), after the fresh ones;
        # rank r holds the contiguous rows [r·R/W, (r+1)·R/W) of the R replayed rows
        R, W = len(rep), self.dist.world
        mine_rows = slice(self.dist.rank * R // W, (self.dist.rank + 1) * R // W)
        mine = [(j, g, e) for j, (g, e) in enumerate(rep)][mine_rows]
        g_rchunks = make_chunks(R, cfg.sample.batch_size, None)
        r_chunks, r_ids = self.dist.local_chunks(g_rchunks, mine_rows)
        chunk_ids += [n_chunks + i for i in r_ids]
        n_chunks += len(g_rchunks)
        if mine:
            dev = states.device
            r_states = torch.zeros((len(mine), T + 1, *states.shape[2:]), device=dev)
            r_train = torch.zeros((len(mine), T), dtype=torch.bool, device=dev)
            beta = torch.zeros((len(mine), T), device=dev)
            for m, (_, _, e) in enumerate(mine):  # entries live on the CPU (buffer.py)
                steps = e.steps.to(dev)
                r_states[m, steps], r_states[m, steps + 1] = e.x.to(dev), e.x_next.to(dev)
                r_train[m, steps] = True
                beta[m, steps] = e.log_prob.to(dev)
            r_cond = self.policy.encode_prompts([e.prompt for _, _, e in mine])
            pi_old = self._score_old(r_states, r_train, r_cond, r_chunks)                    # [R, T]
            rc = cfg.replay
            r_weight, wstats = importance_weights(pi_old, beta, r_train, correction=rc.is_correction,
                                                  form=rc.is_form, cap=rc.is_cap)
            rec.update(wstats)
            rec["replay/age_mean"] = sum(it - e.version for _, _, e in mine) / len(mine)
            chunks += [c + n for c in r_chunks]
            states, train = torch.cat([states, r_states]), torch.cat([train, r_train])
            old, weight = torch.cat([old, pi_old]), torch.cat([weight, r_weight])
            adv = torch.cat([adv, adv_all[n * self.dist.world + torch.tensor([j for j, _, _ in mine])]])
            cond = cat_cond([cond, r_cond])
        dev = states.device
        return UpdateBatch(states, train.to(dev), old.to(dev), adv.to(dev), weight.to(dev), cond, chunks, chunk_ids,
                           n_chunks), rec

    def _row_mask(self, e) -> torch.Tensor:
        m = torch.zeros(self.cfg.sample.steps, dtype=torch.bool)
        m[e.steps] = True
        return m

    def _gather_prompts(self, prompts: list[str]) -> list[str]:
        if self.dist.world == 1:
            return list(prompts)
        return [p for part in self.dist.all_gather_objects(list(prompts)) for p in part]

    def _rescore(self, states: torch.Tensor, idx: torch.Tensor, t: int, cond: dict):
        """Score the stored transitions x_t → x_{t+1} of rows `idx` under the current velocity: the
        same model call on the same chunk as the rollout made, so on policy it is bit-identical."""
        s = self.cfg.sample
        sig, sig_next = float(self.sigmas[t]), float(self.sigmas[t + 1])
        x = states[idx, t]
        v = self.policy.velocity(x, torch.full((len(idx),), sig, device=x.device), cond, s.guidance)
        return self.kernel(x, v, sig, sig_next, s.noise_level, sample=states[idx, t + 1], reduction=s.reduction)

    @torch.no_grad()
    def _score_old(self, states, train, cond, chunks) -> torch.Tensor:
        """π_old log-probs of stored transitions under the current weights, chunk by chunk. [R, T]"""
        out = torch.zeros(train.shape, device=states.device)
        for idx in chunks:
            for t in torch.nonzero(train[idx].any(0)).flatten().tolist():
                st = self._rescore(states, idx, t, select_cond(cond, idx))
                out[idx, t] = torch.where(train[idx, t], st.log_prob, torch.zeros_like(st.log_prob))
        return out

    # ------------------------------------------------------------------ update
    def _update(self, b: UpdateBatch) -> dict:
        cfg = self.cfg
        lr = lr_at(cfg.train, self.iteration)
        set_lr(self.opt, lr)
        self.policy.module.train()  # no dropout/batchnorm in any policy: outputs are unchanged
        # minibatch i = global chunks i, i+mbs, ...: the same rows whatever the number of ranks
        n_chunks = b.n_chunks or len(b.chunks)
        ids = b.chunk_ids if b.chunk_ids is not None else list(range(len(b.chunks)))
        # a minibatch is a set of whole rollout chunks (so the first ratio is exactly 1): at most
        # n_chunks of them, whatever train.minibatches asks for
        mbs = max(1, min(cfg.train.minibatches, n_chunks))
        if mbs < cfg.train.minibatches and not self._warned_minibatches and self.dist.is_main:
            self._warned_minibatches = True
            print(f"flowpo: train.minibatches={cfg.train.minibatches} but iteration {self.iteration} has only "
                  f"{n_chunks} rollout chunks of <= sample.batch_size={cfg.sample.batch_size} rows, and a minibatch "
                  f"is whole chunks: ran {mbs} minibatches per pass (logged as train/optimizer_steps). Lower "
                  "sample.batch_size for more. (Said once per run.)", file=sys.stderr, flush=True)
        groups = [[c for c, g in zip(b.chunks, ids) if g % mbs == i] for i in range(mbs)]
        stats, grad_norms = [], []
        probe = lambda: self.policy.velocity(b.states[:1, 0], torch.ones(1, device=b.states.device),  # noqa: E731
                                             select_cond(b.cond, slice(0, 1)), 1.0)
        for _ in range(cfg.train.inner_epochs):
            for mb in groups:
                count = torch.tensor([float(sum(int(b.train[c].sum()) for c in mb))])
                count = float(self.dist.all_reduce_sum(count))
                if count == 0:
                    continue
                self.opt.zero_grad(set_to_none=True)
                for idx in mb:
                    stats += self._chunk_loss(b, idx, count)
                self.dist.sync_gradients(self.params, probe)                  # Σ over ranks
                grad_norms.append(self.dist.clip_grad_norm(self.params, cfg.train.max_grad_norm))
                check_grad_norm(grad_norms[-1], self.iteration, cfg.model)
                self.opt.step()
                self.dist.gather_params()
                if self.ema is not None:
                    self.ema.update()
        self.policy.module.eval()
        stats = [st for part in self.dist.all_gather_objects(stats) for st in part]    # all ranks' transitions
        out = merge_stats(stats)
        if grad_norms:
            out["stats/grad_norm"] = sum(grad_norms) / len(grad_norms)
        out["train/lr"] = lr
        out["train/optimizer_steps"] = float(len(grad_norms))
        return out

    def _chunk_loss(self, b: UpdateBatch, idx: torch.Tensor, count: float) -> list:
        """Backward the loss of every trained step of one chunk. The forward runs on the whole chunk
        (the same rows as the rollout call), so π_θ is bit-identical to the rollout's on policy."""
        cfg = self.cfg
        cond = select_cond(b.cond, idx)
        out = []
        for t in torch.nonzero(b.train[idx].any(0)).flatten().tolist():
            rows = b.train[idx, t]                                               # [n_c]
            st = self._rescore(b.states, idx, t, cond)
            kl = None
            if cfg.loss.kl_beta > 0:
                with torch.no_grad(), self.policy.disable_adapter():
                    ref = self._rescore(b.states, idx, t, cond)
                dt = float(self.sigmas[t + 1]) - float(self.sigmas[t])
                kl = mean_kl(st.mean, ref.mean, st.std, dt, cfg.loss.kl_form)[rows]
            loss, stat = clipped_surrogate(st.log_prob[rows], b.old_log_prob[idx, t][rows], b.adv[idx, t][rows],
                                           cfg.loss.clip_range, weights=b.weight[idx, t][rows], kl=kl,
                                           kl_beta=cfg.loss.kl_beta, normalizer=count)
            loss.backward()
            out.append(stat)
        return out

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        cfg = self.cfg
        e = cfg.eval
        g = e.guidance if e.guidance is not None else cfg.sample.guidance
        prompts_all = [p for p in self.eval_prompts for _ in range(e.samples_per_prompt)]
        n_all = len(prompts_all)
        pad = (-n_all) % self.dist.world
        prompts_all = prompts_all + prompts_all[:pad]
        local = self.dist.split(len(prompts_all))
        rows = list(range(len(prompts_all)))[local]
        prompts = prompts_all[local]
        x_init = row_noise([_seed(e.seed, i) for i in rows], self.policy.latent_shape).to(self.device)
        if self.ema is not None:
            self.ema.swap()
            self.dist.gather_params()  # FSDP2: the gathered copy must follow the swapped shards
        self.policy.module.eval()
        x0, _ = ode_sample(self.policy, self.policy.encode_prompts(prompts), self.eval_sigmas, x_init, g,
                           cfg.sample.batch_size)
        if self.ema is not None:
            self.ema.swap()
            self.dist.gather_params()
        images = self.policy.decode(x0)
        raw = self.dist.all_gather_cat(self.rewards.score(images, prompts))[:n_all]          # [n_all, K]
        comb = raw @ self.rewards.weights
        rec = {"step": self.iteration, "eval_reward_mean": float(comb.mean()),
               "eval_reward_std": float(comb.std(unbiased=False)), "nfe": self.nfe, "wall_s": self.wall()}
        for k, name in enumerate(self.rewards.names):
            rec[f"eval/{name}"] = float(raw[:, k].mean())
        self.log.write(rec)
        if cfg.log.grids and self.dist.is_main:
            n_show = min(len(prompts), 8 * e.samples_per_prompt * 2)
            self.log.grid(images[:n_show], f"eval_{self.iteration:06d}", nrow=max(8, e.samples_per_prompt * 4))
        return rec

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> None:
        resume.save(self)

    def _load_checkpoint(self) -> None:
        resume.restore(self)


def train(cfg: Config, out: str | Path, *, resume: bool = False) -> dict:
    return Trainer(cfg, out, resume=resume).run()

