"""Images per second with 1 and 2 processes, and gradient communication per optimizer step.

    python benchmarks/distributed_throughput.py [--out runs/bench_dist] [--iterations 4]

Runs `flowpo train` on the embedded model three ways on the same global batch (B·G rows per
iteration): 1 process × 1 thread, 1 process × 2 threads, `torchrun --nproc_per_node=2` × 1 thread
each (gloo). Throughput = rows per iteration / mean `time/iteration_s` (rollout + reward +
advantages + update), skipping the first iteration (warm-up). Then prints the communication
volume per optimizer step for LoRA and full fine-tuning (docs/distributed.md explains the sums).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def run(out: Path, nproc: int, threads: int, args: list[str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = str(threads)
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
              if nproc > 1 else [sys.executable])
    cmd = launch + ["-m", "flowpo", "train", "--out", str(out), f"train.threads={threads}"] + args
    t0 = time.time()
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    wall = time.time() - t0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    its = [r for r in rows if "reward_mean" in r][1:]
    it_s = sum(r["time/iteration_s"] for r in its) / len(its)
    upd_s = sum(r["time/update_s"] for r in its) / len(its)
    roll_s = sum(r["time/rollout_s"] for r in its) / len(its)
    return {"it_s": it_s, "rollout_s": roll_s, "update_s": upd_s, "wall_s": wall}


def comm_table(minibatches: int, rows: int, K: int) -> list[str]:
    """Bytes per optimizer step / per iteration, from the parameter counts of the embedded policy."""
    from flowpo.policy.embedded import EmbeddedPolicy

    out = []
    for mode in ("lora", "full"):
        n = sum(p.numel() for p in EmbeddedPolicy(mode=mode).trainable_parameters())
        step = n * 4
        gathers = rows * (K + 1) * 4 + 4 * 8   # rewards [N, K] (+ combined), counts, nfe
        out.append(f"{mode}: {n} trainable params → {step / 1e6:.3f} MB gradient per optimizer step "
                   f"× {minibatches} = {step * minibatches / 1e6:.3f} MB per iteration (+ ~{gathers} B gathers)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/bench_dist")
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    a = ap.parse_args()
    rows = a.prompts * a.group
    args = [f"train.iterations={a.iterations}", f"sample.prompts_per_iteration={a.prompts}",
            f"sample.group_size={a.group}", f"sample.steps={a.steps}", "sample.batch_size=32",
            "eval.prompts=2", "eval.samples_per_prompt=1", "eval.steps=2", "eval.every=0",
            "train.checkpoint_every=0", "log.progress=false", "log.tensorboard=false", "log.grids=false"]
    root = Path(a.out)
    print(f"global batch: {rows} rows/iteration, T={a.steps}, {a.iterations} iterations (first skipped)")
    print("| processes × threads | s/iteration | rollout s | update s | images/s |")
    print("|---|---|---|---|---|")
    for nproc, threads in ((1, 1), (1, 2), (2, 1)):
        out = root / f"p{nproc}t{threads}-{int(time.time())}"
        r = run(out, nproc, threads, args)
        print(f"| {nproc} × {threads} | {r['it_s']:.2f} | {r['rollout_s']:.2f} | {r['update_s']:.2f} | "
              f"{rows / r['it_s']:.1f} |")
    for line in comm_table(2, rows, 1):
        print(line)


if __name__ == "__main__":
    main()
