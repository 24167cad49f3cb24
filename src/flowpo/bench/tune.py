"""`flowpo tune`: one tuning protocol for every method (issue 29), then the race on held-out seeds.

    flowpo tune --out runs/tune --tasks alignment --presets flow_grpo,awm --iterations 60 \\
        --grid train.lr=3e-4,1e-3,3e-3 --tune-seeds 1000,1001 --seeds 0,1,2,3,4 --jobs 1

1. **Grid**: every preset runs every point of the grid (the Cartesian product of the `--grid KEY=v1,v2`
   options; without a global one, the learning rate over 3e-4, 1e-3, 3e-3, which spans the papers' values)
   on the tuning seeds, in DIR/tune/POINT/ (a `flowpo bench` folder each). `--grid PRESET:KEY=...`
   adds a key for one preset only: clip range or β where that method's paper sweeps it.
2. **Choice**, per (task, preset): the point with the largest mean over the tuning seeds of the
   area under the eval curve (trapezoids over the evaluated iterations, divided by the budget: the
   mean eval reward over training), ties to the earlier grid point. A run that did not finish, or
   whose eval turned NaN, scores −∞. Written to DIR/choice.csv and DIR/choice.md.
3. **Race**: each (task, preset) at its chosen point on the held-out seeds, in DIR/heldout/ (a
   `flowpo bench` folder: results, summary, race.md with 95% bootstrap intervals, plots). The
   target is tuned flow_grpo's mean final eval reward there. The held-out seeds must not be tuning
   seeds; the choice never reads DIR/heldout.

Rerunning the same command resumes every phase, as `flowpo bench` does (finished runs are skipped,
unfinished ones continue from their checkpoint); `--report-only` rebuilds choice and race from
the folders. A held-out run made at another point than the current choice is refused, not mixed.
"""
from __future__ import annotations

import argparse
import itertools
import math
import shlex
import sys
from pathlib import Path

from flowpo.bench.report import REFERENCE, TASKS, Job, eval_curve, read_jsonl, report, run_dir, write_csv
from flowpo.bench.runner import command, csv_list, default_jobs, default_presets, overrides, run_grid

DEFAULT_GRID = "train.lr=3e-4,1e-3,3e-3"
DEFAULT_TUNE_SEEDS = [1000, 1001]
DEFAULT_SEEDS = [0, 1, 2, 3, 4]


# ----------------------------------------------------------------------------- the protocol


def parse_grid(specs: list[str], presets: list[str]) -> dict[str, list[tuple[str, list[str]]]]:
    """--grid options → preset → [(key, values)] in the given order (global keys first per preset)."""
    out: dict[str, list[tuple[str, list[str]]]] = {p: [] for p in presets}
    for spec in specs:
        target, _, rest = spec.rpartition(":") if ":" in spec.split("=", 1)[0] else ("", "", spec)
        key, eq, vals = rest.partition("=")
        values = csv_list(vals)
        if not eq or not key or not values:
            raise ValueError(f"--grid {spec!r}: give KEY=v1,v2 or PRESET:KEY=v1,v2, e.g. --grid {DEFAULT_GRID}")
        if target and target not in out:
            raise ValueError(f"--grid {spec!r}: preset {target!r} is not in --presets {','.join(presets)}")
        for p in ([target] if target else presets):
            if any(k == key for k, _ in out[p]):
                raise ValueError(f"--grid {spec!r}: {key} is already swept for {p}")
            out[p].append((key, values))
    return out


def points(grid: list[tuple[str, list[str]]]) -> list[list[str]]:
    """The grid's points, each a list of KEY=VALUE overrides (the product, in the grid's order)."""
    keys = [k for k, _ in grid]
    return [[f"{k}={v}" for k, v in zip(keys, combo)] for combo in itertools.product(*(v for _, v in grid))]


def label(point: list[str]) -> str:
    """A point's folder name: train.lr=0.001 → lr=0.001; several keys joined by '+'."""
    return "+".join(p.split(".", 1)[-1] for p in point) or "default"


def auc(evals: list[dict], iterations: int) -> float:
    """Area under the eval curve over [0, iterations] divided by iterations (trapezoids between the
    evaluated iterations; the curve must reach the budget). −∞ when it does not, or holds a NaN."""
    pts = [(e["step"], e["eval_reward_mean"]) for e in evals if e["step"] <= iterations]
    if not pts or pts[-1][0] != iterations or any(not math.isfinite(v) for _, v in pts):
        return -math.inf
    if len(pts) == 1:
        return pts[0][1]
    area = sum((b[0] - a[0]) * (a[1] + b[1]) / 2 for a, b in zip(pts, pts[1:]))
    return area / (pts[-1][0] - pts[0][0])


def choose(out: Path, tasks, grids, tune_seeds, iterations) -> tuple[list[dict], dict]:
    """Score every (task, preset, point) on the tuning seeds → (rows of choice.csv, (task, preset) → point)."""
    rows, chosen = [], {}
    for task in tasks:
        for preset, grid in grids.items():
            best, best_score = None, -math.inf
            for pt in points(grid):
                scores = [auc(eval_curve(read_jsonl(run_dir(out / "tune" / label(pt), Job(task, preset, s))
                                                    / "metrics.jsonl")), iterations) for s in tune_seeds]
                mean = sum(scores) / len(scores)
                rows.append({"task": task, "preset": preset, "point": " ".join(pt), "auc_mean": mean,
                             "auc_per_seed": " ".join(f"{x:.4f}" for x in scores), "chosen": False})
                if mean > best_score:
                    best, best_score = (pt, len(rows) - 1), mean
            if best is not None:
                rows[best[1]]["chosen"] = True
                chosen[(task, preset)] = best[0]
    return rows, chosen


def write_choice_md(path: Path, rows: list[dict], cmdline: str, tune_seeds: list[int]) -> None:
    lines = [f"Command: `{cmdline}`", "", f"Tuning seeds: {', '.join(map(str, tune_seeds))}. Score: area under the "
             "eval curve over the budget (mean eval reward over training), mean over the tuning seeds; the "
             "largest wins, ties to the earlier point. −inf: a run did not finish or its eval was NaN.", "",
             "| task | preset | point | AUC (mean) | AUC per seed | chosen |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['preset']} | {r['point']} | {r['auc_mean']:.4f} | {r['auc_per_seed']} "
                     f"| {'**yes**' if r['chosen'] else ''} |")
    path.write_text("\n".join(lines + [""]))


def check_heldout(out: Path, jobs: list[Job], chosen: dict) -> str | None:
    """A message if a held-out run folder was made at another point than the current choice."""
    import yaml

    for job in jobs:
        cfg_path = run_dir(out / "heldout", job) / "config.yaml"
        if not cfg_path.exists():
            continue
        cfg = yaml.safe_load(cfg_path.read_text()) or {}
        for ov in chosen[(job.task, job.preset)]:
            key, _, want = ov.partition("=")
            node = cfg
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            same = node is not None and (math.isclose(float(node), float(want), rel_tol=1e-9)
                                         if _num(want) and _num(str(node)) else str(node) == want)
            if not same:
                return (f"{cfg_path.parent} was run at {key}={node} but the choice is {ov}; remove that folder "
                        f"or use another --out")
    return None


def _num(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="flowpo tune", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("--out", default="runs/tune", help="tune folder (default runs/tune)")
    ap.add_argument("--presets", type=csv_list, help="comma-separated presets (default: every method; flow_grpo "
                                                     "is always added, its tuned runs define the target)")
    ap.add_argument("--tasks", type=csv_list, help=f"comma-separated tasks (default: {','.join(TASKS)})")
    ap.add_argument("--iterations", type=int, default=60, help="iteration budget of every run (default 60)")
    ap.add_argument("--grid", action="append", default=[], metavar="[PRESET:]KEY=v1,v2",
                    help=f"a swept key, repeatable (default {DEFAULT_GRID})")
    ap.add_argument("--tune-seeds", type=csv_list, help="seeds the choice is made on (default 1000,1001)")
    ap.add_argument("--seeds", type=csv_list, help="held-out seeds of the race, at least 5 (default 0,1,2,3,4)")
    ap.add_argument("--jobs", type=int, default=default_jobs(), help="runs in parallel (as flowpo bench)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="extra override for every run, repeatable (e.g. --set eval.every=5)")
    ap.add_argument("--dry-run", action="store_true", help="print the tuning commands, run nothing")
    ap.add_argument("--report-only", action="store_true", help="rebuild choice and race from the folders")
    return ap


def _seeds(ap, arg, default, flag):
    try:
        seeds = default if arg is None else [int(s) for s in arg]
    except ValueError:
        ap.error(f"{flag} {','.join(arg)}: give integers, e.g. {flag} 0,1,2")
    if any(not 0 <= s < 2 ** 63 for s in seeds) or not seeds:
        ap.error(f"{flag}: give seeds from 0 to 2**63 - 1")
    return seeds


def main(argv: list[str] | None = None) -> int:
    from flowpo import config
    from flowpo.presets import PRESETS

    ap = build_parser()
    args = ap.parse_args(argv)
    out = Path(args.out)
    cmdline = "flowpo tune " + shlex.join(sys.argv[1:] if argv is None else argv)
    tune_seeds = _seeds(ap, args.tune_seeds, DEFAULT_TUNE_SEEDS, "--tune-seeds")
    seeds = _seeds(ap, args.seeds, DEFAULT_SEEDS, "--seeds")
    if set(tune_seeds) & set(seeds):
        ap.error(f"--seeds and --tune-seeds share {sorted(set(tune_seeds) & set(seeds))}: the held-out seeds must "
                 "play no part in the choice")
    if len(seeds) < 5:
        print(f"tune: {len(seeds)} held-out seeds; the protocol asks for at least 5", file=sys.stderr, flush=True)
    if args.jobs < 1 or args.iterations < 1:
        ap.error("--jobs and --iterations: give at least 1")
    for s in args.sets:
        if "=" not in s:
            ap.error(f"--set {s!r}: give key.path=value, e.g. --set eval.every=5")
    tasks = args.tasks or list(TASKS)
    presets = args.presets or default_presets()
    bad = [t for t in tasks if t not in TASKS] + [p for p in presets if p not in PRESETS]
    if bad:
        ap.error(f"unknown tasks or presets {bad}; tasks: {list(TASKS)}; presets: flowpo presets")
    presets = [REFERENCE] + [p for p in dict.fromkeys(presets) if p != REFERENCE]
    try:
        glob = [g for g in args.grid if ":" not in g.split("=", 1)[0]]  # no global key given: the lr grid
        grids = parse_grid(([] if glob else [DEFAULT_GRID]) + args.grid, presets)
    except ValueError as e:
        ap.error(str(e))
    for preset, grid in grids.items():  # a bad key or value fails here, once, not in every child
        for pt in points(grid):
            try:
                config.load(None, preset, overrides(Job(tasks[0], preset, tune_seeds[0]), args.iterations, None,
                                                    args.sets + pt))
            except Exception as e:  # noqa: BLE001 — the config's own one-line message
                ap.error(f"--grid point {' '.join(pt)} for {preset}: {e}")

    by_point: dict[str, tuple[list[str], list[str]]] = {}
    for preset, grid in grids.items():
        for pt in points(grid):
            by_point.setdefault(label(pt), (pt, []))[1].append(preset)
    if args.dry_run:
        for lab, (pt, ps) in by_point.items():
            for job in (Job(t, p, s) for t in tasks for p in ps for s in tune_seeds):
                cmd, mode = command(out / "tune" / lab, job, args.iterations, 1 if args.jobs > 1 else None,
                                    args.sets + pt)
                print(f"# {job.name}: finished, skipped" if mode == "skip" else shlex.join(cmd))
        print("# then the held-out runs at each (task, preset)'s chosen point (flowpo tune without --dry-run)")
        return 0

    try:
        return _run(ap, args, out, cmdline, tasks, presets, grids, by_point, tune_seeds, seeds)
    except KeyboardInterrupt:
        print("tune: interrupted; rerun the same command to resume", file=sys.stderr, flush=True)
        return 130


def _run(ap, args, out, cmdline, tasks, presets, grids, by_point, tune_seeds, seeds) -> int:
    """The three phases (grid, choice, held-out race); each resumes what a previous call left."""
    failed = 0
    if not args.report_only:
        out.mkdir(parents=True, exist_ok=True)
        (out / "command.txt").write_text(cmdline + "\n")
        for lab, (pt, ps) in by_point.items():
            print(f"tune: grid point {lab}", flush=True)
            jobs = [Job(t, p, s) for t in tasks for s in tune_seeds for p in ps]
            failed += run_grid(out / "tune" / lab, jobs, args.iterations, args.jobs, args.sets + pt)
    rows, chosen = choose(out, tasks, grids, tune_seeds, args.iterations)
    write_csv(out / "choice.csv", rows)
    write_choice_md(out / "choice.md", rows, cmdline, tune_seeds)
    print(f"tune: wrote {out / 'choice.md'}", flush=True)
    jobs = [Job(t, p, s) for t in tasks for s in seeds for p in presets]
    clash = check_heldout(out, jobs, chosen)
    if clash:
        ap.error(clash)
    if not args.report_only:
        for pt in {tuple(v) for v in chosen.values()}:
            mine = [j for j in jobs if tuple(chosen[(j.task, j.preset)]) == pt]
            print(f"tune: held-out runs at {label(list(pt))}", flush=True)
            failed += run_grid(out / "heldout", mine, args.iterations, args.jobs, args.sets + list(pt))
    have = [j for j in jobs if run_dir(out / "heldout", j).exists()]
    if have:
        report(out / "heldout", have, args.iterations, cmdline,
               lr={k: label(v) for k, v in chosen.items()})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
