"""Scoring rollout chunks while the next ones sample (reward.overlap=true).

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

    def result(self) -> tuple[torch.Tensor, dict[str, torch.Tensor], float]:
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
