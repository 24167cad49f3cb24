"""`flowpo bench`: every preset × task × seed at one iteration budget, then results.csv, summary, plots.

    flowpo bench --out runs/bench --iterations 60 --seeds 0,1,2 --tasks alignment,multi --jobs 2
    flowpo bench --out runs/bench --report-only          # rebuild results/summary/plots from the run folders

Each run is a separate `python -m flowpo train` process (a crash stays isolated, the grid goes on),
J at a time, in DIR/runs/TASK/PRESET/seedS. Rerunning the same command resumes: finished runs (an
eval line at step == iterations) are skipped, unfinished ones continue with `flowpo train --resume`.

Target (DESIGN.md, "Benchmark results"): on each task, the mean over seeds of flow_grpo's final
eval reward at the same budget. steps_to_target is the first evaluated iteration whose eval reward
is ≥ target (empty if none); wall_s_to_target and nfe_to_target are that eval line's wall_s, nfe.

Outputs in DIR: results.csv (one row per run), summary.csv and summary.md (per task × preset, mean
and std over seeds), plots/TASK_vs_{iterations,wall,nfe}.png, failures.txt (stderr tails, if any),
logs/TASK/PRESET/seedS.{out,err,json} (child output and its peak RSS from os.wait4), race.csv and
race.md (mean and 95% bootstrap interval of iterations and wall time to target, runs that never
reach it censored at the budget; flowpo.bench.stats).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import queue
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from flowpo.bench.report import (REFERENCE, TASKS, Job, discover, is_finished, log_stem, read_jsonl, report, run_dir,
                                 run_stats)

# ----------------------------------------------------------------------------- the grid


def overrides(job: Job, iterations: int, threads: int | None, sets: list[str]) -> list[str]:
    ov = [f"train.seed={job.seed}", f"train.iterations={iterations}", "log.progress=false", "log.tensorboard=false"]
    ov += list(TASKS[job.task].overrides)
    if threads:
        ov.append(f"train.threads={threads}")
    return ov + list(sets)  # --set last: the user's word wins


def command(out: Path, job: Job, iterations: int, threads: int | None, sets: list[str]) -> tuple[list[str], str]:
    """The child command line for this job and what it does: 'skip', 'resume', 'fresh' or 'restart'."""
    d = run_dir(out, job)
    ov = overrides(job, iterations, threads, sets)
    if is_finished(d, iterations):
        return [], "skip"
    if d.exists():
        from flowpo.training import checkpoint

        if (d / "config.yaml").exists() and checkpoint.latest(d) is not None and not _schedule_bound(d, iterations):
            return [sys.executable, "-m", "flowpo", "train", "--resume", str(d), *ov], "resume"
        # started but never checkpointed, or a decaying learning rate fixed to another budget (extending
        # it would not equal a fresh run at this budget): start over
        mode = "restart"
    else:
        mode = "fresh"
    return [sys.executable, "-m", "flowpo", "train", "--preset", job.preset, "--out", str(d), *ov], mode


def _schedule_bound(d: Path, iterations: int) -> bool:
    """Whether the run in `d` decays its learning rate over a horizon other than `iterations`."""
    import yaml

    try:
        t = (yaml.safe_load((d / "config.yaml").read_text()) or {}).get("train", {})
    except (OSError, yaml.YAMLError):
        return True
    horizon = t.get("lr_horizon") or t.get("iterations")
    return t.get("lr_schedule", "constant") != "constant" and horizon != iterations


def launch(out: Path, job: Job, cmd: list[str], env: dict, done: queue.Queue, procs: dict) -> None:
    """Thread body: run one child, reap it with os.wait4 (its own rusage), report on `done`."""
    stem = log_stem(out, job)
    stem.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    try:
        with open(f"{stem}.out", "w") as fo, open(f"{stem}.err", "w") as fe:
            p = subprocess.Popen(cmd, stdout=fo, stderr=fe, env=env, stdin=subprocess.DEVNULL)
            procs[job] = p
            _, status, usage = os.wait4(p.pid, 0)
            p.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen consistent
        peak_mb = usage.ru_maxrss / 1024.0  # Linux: KiB
        done.put((job, p.returncode, time.time() - t0, peak_mb))
    except Exception as e:  # noqa: BLE001 — a launch failure is one failed run, not a dead grid
        Path(f"{stem}.err").write_text(f"bench: could not run {shlex.join(cmd)}: {e!r}\n")
        done.put((job, -1, time.time() - t0, None))


def record_rusage(out: Path, job: Job, rc: int, seconds: float, peak_mb: float | None, cmd: list[str]) -> None:
    """logs/…/seedS.json keeps the peak RSS over all the segments (fresh + resumes) of a run."""
    path = Path(f"{log_stem(out, job)}.json")
    old = json.loads(path.read_text()) if path.exists() else {}
    peaks = [x for x in (old.get("peak_rss_mb"), peak_mb) if x is not None]
    path.write_text(json.dumps({"peak_rss_mb": max(peaks) if peaks else None, "returncode": rc,
                                "seconds": seconds, "command": cmd}, indent=1))


def tail(path: Path, n: int = 25) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


def hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def run_grid(out: Path, jobs: list[Job], iterations: int, n_parallel: int, sets: list[str]) -> int:
    """Run the unfinished jobs, n_parallel at a time. Returns the number of failed runs."""
    threads = 1 if n_parallel > 1 else None
    env = dict(os.environ)
    if threads:
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("MKL_NUM_THREADS", "1")
    todo = []
    for job in jobs:
        cmd, mode = command(out, job, iterations, threads, sets)
        if mode == "skip":
            continue
        if mode == "restart":
            shutil.rmtree(run_dir(out, job))
        todo.append((job, cmd, mode))
    print(f"bench: {len(jobs)} runs, {len(jobs) - len(todo)} already finished, {len(todo)} to run, "
          f"{n_parallel} at a time", flush=True)
    failures_path = out / "failures.txt"
    failures_path.unlink(missing_ok=True)
    done: queue.Queue = queue.Queue()
    procs: dict[Job, subprocess.Popen] = {}
    pending, running, n_done, n_failed = list(todo), 0, 0, 0
    t0 = time.time()
    try:
        while pending or running:
            while pending and running < n_parallel:
                job, cmd, mode = pending.pop(0)
                threading.Thread(target=launch, args=(out, job, cmd, env, done, procs), daemon=True).start()
                running += 1
            try:
                job, rc, seconds, peak_mb = done.get(timeout=0.5)
            except queue.Empty:
                continue
            running -= 1
            n_done += 1
            cmd = next(c for j, c, _ in todo if j == job)
            record_rusage(out, job, rc, seconds, peak_mb, cmd)
            elapsed = time.time() - t0
            eta = elapsed / n_done * (len(todo) - n_done)
            if rc == 0:
                final = run_stats(read_jsonl(run_dir(out, job) / "metrics.jsonl"), iterations)["final_eval_reward"]
                what = f"ok    final eval {final:.4f}" if final is not None else "ok    (no final eval line?)"
            else:
                n_failed += 1
                what = f"FAILED (exit {rc}; see {failures_path})"
                with open(failures_path, "a") as f:
                    f.write(f"== {job.name}  exit {rc}  {datetime.datetime.now().isoformat(timespec='seconds')}\n"
                            f"$ {shlex.join(cmd)}\n{tail(Path(f'{log_stem(out, job)}.err'))}\n\n")
            rss = f"{peak_mb:.0f} MB" if peak_mb is not None else "? MB"
            print(f"[{n_done}/{len(todo)}] {hms(elapsed)} elapsed, ETA {hms(eta)}  {job.name:<40} {what}  "
                  f"{seconds:.1f} s  peak {rss}", flush=True)
    except KeyboardInterrupt:
        for p in list(procs.values()):
            if p.returncode is None:
                try:
                    p.send_signal(signal.SIGINT)
                except ProcessLookupError:
                    pass
        deadline = time.time() + 30
        while running and time.time() < deadline:
            try:
                done.get(timeout=0.5)
                running -= 1
            except queue.Empty:
                pass
        raise
    return n_failed


# ----------------------------------------------------------------------------- command line


def default_presets() -> list[str]:
    """Every registered method preset: the seed methods and the project's own flowpo_* combinations
    (ablation variants run only when named in --presets)."""
    from flowpo.presets import methods

    return methods()


def default_jobs() -> int:
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, n // 2)


def csv_list(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="flowpo bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="tasks:\n" + "\n".join(f"  {k:<10} {t.description}: {' '.join(t.overrides)}"
                                                              for k, t in TASKS.items()))
    ap.add_argument("--out", default="runs/bench", help="bench folder (default runs/bench)")
    ap.add_argument("--presets", type=csv_list, help="comma-separated presets (default: all; flow_grpo is always "
                                                     "added, it defines the target)")
    ap.add_argument("--seeds", type=csv_list, help="comma-separated seeds (default 0,1,2)")
    ap.add_argument("--tasks", type=csv_list, help=f"comma-separated tasks (default: {','.join(TASKS)})")
    ap.add_argument("--iterations", type=int, default=None,
                    help="iteration budget of every run (default: the config's train.iterations, 100)")
    ap.add_argument("--jobs", type=int, default=default_jobs(),
                    help="runs in parallel (default: usable CPUs // 2); if > 1, each child uses train.threads=1")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="extra override for every run, repeatable (e.g. --set eval.every=5)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    ap.add_argument("--report-only", action="store_true", help="rebuild results.csv, summary and plots from the "
                                                              "run folders in --out")
    return ap


def main(argv: list[str] | None = None) -> int:
    from flowpo import config
    from flowpo.presets import PRESETS

    ap = build_parser()
    args = ap.parse_args(argv)
    out = Path(args.out)
    cmdline = "flowpo bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    for s in args.sets:
        if "=" not in s:
            ap.error(f"--set {s!r}: give key.path=value, e.g. --set eval.every=5")
    try:
        seeds = None if args.seeds is None else [int(s) for s in args.seeds]
    except ValueError:
        ap.error(f"--seeds {','.join(args.seeds)}: give integers, e.g. --seeds 0,1,2")
    if args.jobs < 1:
        ap.error(f"--jobs {args.jobs}: give at least 1")
    if args.iterations is not None and args.iterations < 0:
        ap.error(f"--iterations {args.iterations}: give 0 or more")
    if seeds is not None and any(not 0 <= s < 2 ** 63 for s in seeds):
        ap.error(f"--seeds {','.join(args.seeds)}: give seeds from 0 to 2**63 - 1")
    if not args.out.strip() or (out.exists() and not out.is_dir()):
        ap.error(f"--out {args.out!r}: give a folder path (not empty, not an existing file)")

    if args.report_only:
        jobs = [j for j in discover(out) if (args.tasks is None or j.task in args.tasks)
                and (args.presets is None or j.preset in args.presets)
                and (seeds is None or j.seed in seeds)]
        if not jobs:
            ap.error(f"--report-only: no run folders under {out / 'runs'}; run flowpo bench --out {out} first")
        saved = out / "command.txt"
        report(out, jobs, args.iterations, saved.read_text().strip() if saved.exists() else cmdline)
        return 0

    tasks = args.tasks or list(TASKS)
    presets = args.presets or default_presets()
    bad_t = [t for t in tasks if t not in TASKS]
    bad_p = [p for p in presets if p not in PRESETS]
    if bad_t:
        ap.error(f"--tasks: unknown {bad_t}; available: {list(TASKS)}")
    if bad_p:
        ap.error(f"--presets: unknown {bad_p}; available: {list(PRESETS)} (flowpo presets)")
    if REFERENCE not in presets:
        print(f"bench: adding {REFERENCE} to --presets: it defines the target", flush=True)
        presets = [REFERENCE] + presets
    presets = [REFERENCE] + [p for p in dict.fromkeys(presets) if p != REFERENCE]  # reference runs first
    iterations = args.iterations if args.iterations is not None else config.Config().train.iterations
    seeds = [0, 1, 2] if seeds is None else seeds
    # catch a bad --set or task override now, once, rather than in every child
    for t in tasks:
        for p in presets:
            config.load(None, p, overrides(Job(t, p, seeds[0]), iterations, None, args.sets))
    jobs = [Job(t, p, s) for t in tasks for s in seeds for p in presets]
    over = [j.name for j in jobs if any(r.get("reward_mean") is not None and r["step"] >= iterations
                                        for r in read_jsonl(run_dir(out, j) / "metrics.jsonl"))]
    if over:
        ap.error(f"--iterations {iterations}: {len(over)} run folders in {out} already trained longer "
                 f"(e.g. {over[0]}); use another --out, or --report-only")
    threads = 1 if args.jobs > 1 else None

    if args.dry_run:
        for job in jobs:
            cmd, mode = command(out, job, iterations, threads, args.sets)
            if mode == "skip":
                print(f"# {job.name}: finished, skipped")
                continue
            if mode == "restart":
                print(f"rm -rf {shlex.quote(str(run_dir(out, job)))}  # started but never checkpointed")
            print(shlex.join(cmd))
        return 0

    out.mkdir(parents=True, exist_ok=True)
    (out / "command.txt").write_text(cmdline + "\n")
    t0 = time.time()
    try:
        n_failed = run_grid(out, jobs, iterations, args.jobs, args.sets)
    except KeyboardInterrupt:
        print(f"bench: interrupted; rerun the same command to resume ({hms(time.time() - t0)} spent)",
              file=sys.stderr, flush=True)
        report(out, jobs, iterations, cmdline)
        return 130
    rows = report(out, jobs, iterations, cmdline)
    print(f"bench: done in {hms(time.time() - t0)}; {sum(r['status'] == 'ok' for r in rows)}/{len(rows)} runs "
          f"finished" + (f", {n_failed} failed (see {out / 'failures.txt'})" if n_failed else ""), flush=True)
    return 1 if n_failed else 0


if __name__ == "__main__":
    sys.exit(main())
