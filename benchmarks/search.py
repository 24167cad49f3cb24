"""Short-budget search over candidate recipes, scored against the committed bench targets.

Each candidate is a preset plus overrides. Every candidate runs on every task × seed for a short
budget (default 20 iterations, evaluation every 5), in parallel child processes with one thread
each, exactly as `flowpo bench` runs its children. The target of each task is flow_grpo's mean final
eval reward in benchmarks/results.csv (the 60-iteration bench), so a candidate is scored on what
the bench measures: the first evaluated iteration at or above that target, and its wall time.

Use seeds that the bench does not use (default 10,11,12) so that choosing a recipe here does not
select on the seeds it is finally reported on.

    python benchmarks/search.py --out runs/search \
        --cand "lr1e3|flowpo_fast|train.lr=1e-3" --cand "base|flowpo_fast"

Finished runs are skipped, so the same command can be repeated with more candidates.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from flowpo.bench import overrides
from flowpo.bench.report import REFERENCE, Job, eval_curve, first_reach, is_finished, read_jsonl, run_stats, targets

ROOT = Path(__file__).resolve().parents[1]


def bench_targets(results: Path) -> dict[str, float]:
    """Each task's target in the committed results: flow_grpo's mean final eval at the bench budget."""
    rows = [{**r, "iterations": int(r["iterations"]),
             "final_eval_reward": float(r["final_eval_reward"]) if r["final_eval_reward"] else None}
            for r in csv.DictReader(results.open()) if r["preset"] == REFERENCE]
    return {task: v for (task, _), v in targets(rows).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/search")
    ap.add_argument("--cand", action="append", default=[], help="NAME|PRESET|KEY=VALUE KEY=VALUE ... (repeatable)")
    ap.add_argument("--seeds", default="10,11,12")
    ap.add_argument("--tasks", default="alignment,multi")
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results.csv"))
    ap.add_argument("--report-only", action="store_true")
    a = ap.parse_args()
    out = Path(a.out)
    tgt = bench_targets(Path(a.results))
    seeds = [int(s) for s in a.seeds.split(",")]
    tasks = a.tasks.split(",")
    cands = []
    for c in a.cand:
        name, preset, *rest = c.split("|")
        cands.append((name, preset, rest[0].split() if rest and rest[0].strip() else []))

    jobs = []
    for name, preset, over in cands:
        for task in tasks:
            for seed in seeds:
                run = out / name / task / f"seed{seed}"
                if a.report_only or is_finished(run, a.iterations):
                    continue
                extra = ["log.grids=false", f"eval.every={a.every}", "train.checkpoint_every=0", *over]
                cmd = [sys.executable, "-m", "flowpo", "train", "--preset", preset, "--out", str(run),
                       *overrides(Job(task, preset, seed), a.iterations, 1, extra)]
                jobs.append((run, cmd))

    def launch(job):
        run, cmd = job
        run.mkdir(parents=True, exist_ok=True)
        with (run.parent / f"{run.name}.log").open("w") as log:
            rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        print(f"search: {'ok' if rc == 0 else f'FAILED rc={rc}'} {run}", flush=True)

    if jobs:
        print(f"search: {len(jobs)} runs, {a.jobs} at a time", flush=True)
        with ThreadPoolExecutor(a.jobs) as ex:
            list(ex.map(launch, jobs))

    names = [c[0] for c in cands] or sorted(p.name for p in out.iterdir() if p.is_dir())
    print(f"targets: " + ", ".join(f"{t} {v:.4f}" for t, v in tgt.items()))
    print(f"{'candidate':28s} {'task':9s} reached  iters_to_target      wall_s_to_target     final@{a.iterations}  s/iter")
    for name in names:
        for task in tasks:
            hits, walls, finals, spi = [], [], [], []
            for seed in seeds:
                rows = read_jsonl(out / name / task / f"seed{seed}" / "metrics.jsonl")
                ev = eval_curve(rows)
                if not ev or ev[-1]["step"] != a.iterations:  # unfinished or failed: rerun the command
                    continue
                hit = first_reach(ev, tgt[task])
                hits.append(hit["step"] if hit else None)
                walls.append(hit["wall_s"] if hit else None)
                finals.append(ev[-1]["eval_reward_mean"])
                spi.append(run_stats(rows, a.iterations)["s_per_iteration"])
            if not finals:
                continue
            r = [h for h in hits if h is not None]
            print(f"{name:28s} {task:9s} {len(r)}/{len(hits)}      "
                  f"{' '.join(str(h) if h is not None else '-' for h in hits):20s} "
                  f"{' '.join(f'{x:.0f}' if x is not None else '-' for x in walls):20s} "
                  f"{statistics.mean(finals):.3f}±{statistics.pstdev(finals):.3f}  {statistics.mean(spi):.2f}")


if __name__ == "__main__":
    main()
