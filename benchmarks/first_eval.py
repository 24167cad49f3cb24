"""The best eval reward any run of a race folder reached at an early evaluation, per preset.

Issue 29's goal, ≤ 0.25 of tuned flow_grpo's iterations, means reaching the target at the first
evaluation after step 0 when flow_grpo needs ~25 iterations and evaluations come every 5. This
reads every run of a `flowpo tune` folder (tuning grid and held-out seeds alike) and prints, per
preset, the largest eval reward at that step over all its runs, so the question "did any method at
any grid point get there" is answered from the runs, not guessed.

    python benchmarks/first_eval.py runs/race --task heavy --step 5 --target 0.80865
"""
from __future__ import annotations

import argparse
from pathlib import Path

from flowpo.bench.report import eval_curve, read_jsonl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="a `flowpo tune --out` folder")
    ap.add_argument("--task", required=True)
    ap.add_argument("--step", type=int, default=5, help="the evaluation step to read (default 5)")
    ap.add_argument("--target", type=float, help="print how many runs reach it at that step")
    args = ap.parse_args()
    best: dict[str, tuple[float, str, int, int]] = {}
    for f in sorted(args.out.glob(f"*/**/runs/{args.task}/*/*/metrics.jsonl")):
        at = [r["eval_reward_mean"] for r in eval_curve(read_jsonl(f)) if r["step"] == args.step]
        if not at:
            continue
        preset, where = f.parent.parent.name, "/".join(f.relative_to(args.out).parts[:2])
        old = best.get(preset, (-1.0, "", 0, 0))
        hit = int(args.target is not None and at[0] >= args.target)
        best[preset] = (max(old[0], at[0]), where if at[0] > old[0] else old[1], old[2] + 1, old[3] + hit)
    if not best:
        raise SystemExit(f"no run of task {args.task!r} with an evaluation at step {args.step} under {args.out}")
    print(f"| preset | runs | best eval at step {args.step} | where | runs ≥ target |")
    print("|---|---|---|---|---|")
    for preset, (v, where, n, hits) in sorted(best.items(), key=lambda kv: -kv[1][0]):
        print(f"| {preset} | {n} | {v:.3f} | {where} | {hits if args.target is not None else ''} |")


if __name__ == "__main__":
    main()
