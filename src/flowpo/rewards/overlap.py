"""The scoring part: how an iteration's final samples get their rewards, chosen once at build:
`BatchScoring` (all rows once the rollout is done) or `OverlapScoring` (reward.overlap=true: each
chunk while the next ones sample). Either opens one session per iteration:

    session = scoring.open(prompts, metadata)     session.on_chunk: the rollout's per-chunk hook (or None)
    raw [n, K], detail [n, F], busy_s = session.result(final latents [n, *D])
    session.close()                               (idempotent; after a failure too)

Overlapped scoring:

The rollout runs chunk by chunk (flowpo.rollout.sample); each finished chunk is decoded on the
caller's thread and handed to one worker thread that scores it with the RewardSet, so a remote
scorer's network wait, or a scorer on another device, runs while the policy samples the next
chunk. One worker, chunks in submission order: the scorer sees the same calls (one per chunk, the
chunk's rows in order) whatever the thread timing, so the rewards are deterministic; they equal
scoring all rows at once for any scorer whose value for an image does not depend on the other
images of its batch.

What stays serial: the last chunk's scoring (nothing left to overlap it with), stepwise
intermediate rewards, regenerated replay tails and evaluation.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Callable

import torch


class ChunkScoring:
    """submit(rows, final latents) per finished chunk; result() → (raw [n, K], detail {key: [n]},
    seconds the worker spent scoring). A scorer's failure is raised at the next submit or at
    result(), with the scorer's own one-line message."""

    def __init__(self, rewards, decode: Callable[[torch.Tensor], torch.Tensor], prompts: list[str],
                 metadata: list[dict], n: int, *, fail_fast: bool = True, pool: ThreadPoolExecutor | None = None):
        """fail_fast: raise a failed chunk's error at the next submit (False under lock-stepped
        ranks, whose rollouts are collectives every rank must finish; it is raised by result()).
        pool: a one-worker executor kept across iterations (so a remote scorer's HTTP session, which
        is per thread, keeps its connections); None: one of its own, shut down by close()."""
        self.rewards, self.decode, self.prompts, self.metadata, self.n = rewards, decode, prompts, metadata, n
        self.fail_fast = fail_fast
        self.own_pool = pool is None
        self.pool = new_pool() if pool is None else pool
        self.jobs: list[tuple[torch.Tensor, Future]] = []
        self.busy = 0.0
        self.error: BaseException | None = None  # the first chunk's failure (the worker's; read after it)

    def _score(self, images, prompts, metadata):
        if self.error is not None:  # an earlier chunk failed: do not spend another round of retries
            raise self.error
        t0 = time.perf_counter()
        try:
            return self.rewards.score_detail(images, prompts, metadata)
        except BaseException as e:
            self.error = e
            raise
        finally:
            self.busy += time.perf_counter() - t0

    def submit(self, rows: torch.Tensor, final: torch.Tensor) -> None:
        for _, f in self.jobs if self.fail_fast else ():  # do not sample on while a chunk's scoring has failed
            if f.done() and f.exception() is not None:
                self.close()
                raise f.exception()
        rows = rows.cpu()
        images = self.decode(final)
        ids = rows.tolist()
        self.jobs.append((rows, self.pool.submit(self._score, images, [self.prompts[i] for i in ids],
                                                 [self.metadata[i] for i in ids])))

    @property
    def on_chunk(self):
        return self.submit

    def result(self, final=None) -> tuple[torch.Tensor, dict[str, torch.Tensor], float]:
        """(raw [n, K], detail {key: [n]}, seconds scoring); `final` is unused (the chunks came
        through submit)."""
        try:
            parts = [(rows, f.result()) for rows, f in self.jobs]
        finally:
            self.close()
        k = len(self.rewards.names)
        raw = torch.zeros(self.n, k)
        keys = sorted(set().union(*(d for _, (_, d) in parts))) if parts else []
        detail = {key: torch.zeros(self.n) for key in keys}
        for rows, (r, d) in parts:
            if sorted(d) != keys:
                from flowpo.rewards import RewardError

                raise RewardError(f"the rewards returned detail fields {sorted(d)} for one chunk and {keys} for "
                                  "another; a scorer must return the same fields on every call")
            raw[rows] = r
            for key in keys:
                detail[key][rows] = d[key]
        return raw, detail, self.busy

    def close(self) -> None:
        """Cancel the chunks not started, wait for the one being scored (bounded by its retries)."""
        if self.own_pool:
            self.pool.shutdown(wait=True, cancel_futures=True)
            return
        pending = [f for _, f in self.jobs if not f.cancel()]
        wait(pending)


def new_pool() -> ThreadPoolExecutor:
    """The one scoring worker (one thread: the scorer sees its calls in submission order)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="flowpo-reward")


class _AllAtOnce:
    """A BatchScoring session: nothing during the rollout, every row at the end."""

    on_chunk = None

    def __init__(self, rewards, decode, prompts: list[str], metadata: list[dict]):
        self.rewards, self.decode, self.prompts, self.metadata = rewards, decode, prompts, metadata

    def result(self, final: torch.Tensor):
        t0 = time.perf_counter()
        raw, detail = self.rewards.score_detail(self.decode(final), self.prompts, self.metadata)
        return raw, detail, time.perf_counter() - t0

    def close(self) -> None:
        pass


class _Detailed:
    """A session whose detail fields come as one [n, F] tensor (NaN where a call gave none)."""

    def __init__(self, inner, keys: list[str], n: int):
        self.inner, self.keys, self.n = inner, keys, n

    on_chunk = property(lambda self: self.inner.on_chunk)

    def result(self, final: torch.Tensor):
        raw, detail, busy = self.inner.result(final)
        table = (torch.stack([detail.get(k, torch.full((self.n,), float("nan"))) for k in self.keys], 1)
                 if self.keys else torch.zeros(self.n, 0))
        return raw, table, busy

    def close(self) -> None:
        self.inner.close()


class BatchScoring:
    """reward.overlap=false: decode and score all rows once the rollout is done. Also the logging of
    the rewards and their detail fields (shared with OverlapScoring)."""

    def __init__(self, rewards, decode):
        self.rewards, self.decode = rewards, decode
        self.detail_keys: list[str] = []

    def preflight(self, policy, device, prompt: str, meta: dict) -> None:
        """Score two decoded latents with every reward before anything is written, so a scorer that
        raises or returns NaN or the wrong count fails now, in one line, not after an iteration;
        learn the detail fields the scorers return (the same on every rank: the same probe)."""
        with torch.no_grad():
            probe = torch.zeros((2, *policy.latent_shape), device=device)
            _, detail = self.rewards.score_detail(self.decode(probe), [prompt] * 2, [meta] * 2)
        self.detail_keys = sorted(detail)

    def open(self, prompts: list[str], metadata: list[dict]):
        return self._detailed(_AllAtOnce(self.rewards, self.decode, prompts, metadata), len(prompts))

    def _detailed(self, session, n: int):
        return _Detailed(session, self.detail_keys, n)

    def stats(self, fresh) -> dict:
        """Reward metrics of the global fresh rows (a flowpo.trajectory.Trajectory)."""
        comb = self.rewards.combine(fresh.raw)
        rec = {"reward_mean": float(comb.mean()), "reward_std": float(comb.std(unbiased=False)),
               "reward_min": float(comb.min()), "reward_max": float(comb.max())}
        rec.update({f"reward/{name}": float(fresh.raw[:, k].mean()) for k, name in enumerate(self.rewards.names)})
        rec.update({f"reward/{k}": float(fresh.detail[:, j].nanmean()) for j, k in enumerate(self.detail_keys)})
        return rec

    def close(self) -> None:
        pass


class OverlapScoring(BatchScoring):
    """reward.overlap=true: `ChunkScoring` sessions on one worker thread kept for the run (a remote
    scorer's HTTP connections are reused across iterations). fail_fast: False under lock-stepped
    ranks, whose rollouts are collectives every rank must finish."""

    def __init__(self, rewards, decode, fail_fast: bool):
        super().__init__(rewards, decode)
        self.fail_fast, self.pool = fail_fast, None

    def open(self, prompts: list[str], metadata: list[dict]):
        if self.pool is None:
            self.pool = new_pool()
        return self._detailed(ChunkScoring(self.rewards, self.decode, prompts, metadata, len(prompts),
                                           fail_fast=self.fail_fast, pool=self.pool), len(prompts))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None


def build_scoring(overlap: bool, rewards, decode, lockstep: bool):
    """The scoring part for reward.overlap."""
    return OverlapScoring(rewards, decode, fail_fast=not lockstep) if overlap else BatchScoring(rewards, decode)
