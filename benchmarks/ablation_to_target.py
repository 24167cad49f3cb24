"""Iterations to a target for hand-run ablations: one folder of `flowpo train` runs per seed.

The race (`flowpo tune`) reports iterations to target for its own folders. An ablation run after a
race (one preset with one key changed, on the race's held-out seeds) is read here with the race's
own pieces: the first evaluation at the target (`report.first_reach`), the last evaluated step for
a run that never reaches it (`stats.censored`: counted, not dropped), and the percentile bootstrap
of the mean (`stats.bootstrap_ci`).

    python benchmarks/ablation_to_target.py runs/abl_multi/flowpo_nft_noreplay --target 1.5506 --parts 10,20,30

`--parts` adds, per folder, the mean over seeds of each reward's own eval score (`eval/<name>`) at
those steps, to see which part of a weighted sum a change moves. A race's held-out folder
(`runs/race/heldout/runs/TASK/PRESET`) holds seed folders too and is read the same way.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from flowpo.bench.report import eval_curve, first_reach, read_jsonl
from flowpo.bench.stats import bootstrap_ci, censored


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", type=Path, nargs="+", help="folders holding seed*/metrics.jsonl")
    ap.add_argument("--target", type=float, required=True)
    ap.add_argument("--parts", default="", help="comma-separated steps: print each reward's mean eval there")
    args = ap.parse_args()
    steps = [int(s) for s in args.parts.split(",") if s]
    parts: list[str] = []
    print("| folder | seeds reaching | iterations to target [95% CI] | per seed | final eval |")
    print("|---|---|---|---|---|")
    for folder in args.folders:
        runs = sorted(folder.glob("seed*/metrics.jsonl"))
        if not runs:
            raise SystemExit(f"no seed*/metrics.jsonl under {folder}: pass the folder that holds the seed folders")
        its, finals, hits = [], [], 0
        by_part: dict[tuple[str, int], list[float]] = {}
        for f in runs:
            curve = eval_curve(read_jsonl(f))
            hit = first_reach(curve, args.target)
            n, _, cut = censored({"steps_to_target": hit and hit["step"], "wall_s_to_target": None,
                                  "iterations": curve[-1]["step"], "wall_s_total": None})
            hits += not cut
            its.append(n)
            finals.append(curve[-1]["eval_reward_mean"])
            for r in curve:
                if r["step"] in steps:
                    for k, v in r.items():
                        if k.startswith("eval/"):
                            by_part.setdefault((k, r["step"]), []).append(v)
        lo, hi = bootstrap_ci(its)
        print(f"| {folder} | {hits}/{len(runs)} | {statistics.fmean(its):.1f} [{lo:.1f}, {hi:.1f}] | "
              f"{' / '.join(str(int(i)) for i in its)} | {statistics.fmean(finals):.3f} |")
        for name in sorted({k for k, _ in by_part}):
            at = [f"{s}: {statistics.fmean(by_part[name, s]):.3f}" for s in steps if (name, s) in by_part]
            parts.append(f"{folder} {name} at steps " + ", ".join(at))
    for line in parts:
        print(line)


if __name__ == "__main__":
    main()
