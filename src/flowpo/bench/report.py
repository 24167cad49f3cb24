"""`flowpo bench`'s definitions and report: tasks, run folders, one run's numbers (target,
steps/wall/NFE to target), results.csv, summary.csv/summary.md and the plots.

The runner (`flowpo.bench`) launches the runs; everything here only reads run folders, so
`flowpo bench --report-only` and the tests use it without running anything.
"""
from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import statistics
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Task:
    description: str
    overrides: tuple[str, ...]


TASKS: dict[str, Task] = {
    "alignment": Task("prompt–digit alignment alone (the embedded classifier's probability of the prompted digit)",
                      ("reward.names=[digit_alignment]",)),
    "multi": Task("alignment + stroke quality, equal weights (multi-reward aggregation)",
                  ("reward.names=[digit_alignment,stroke_quality]", "reward.weights=[1.0,1.0]")),
    "sparse": Task("binary success: the prompted digit in bold strokes (~10% of base samples; GenEval-like)",
                   ("reward.names=[digit_bold]",)),
    "heavy": Task("the prompted digit in heavy strokes: p_clf(digit) times a one-sided penalty on ink below 0.42 "
                  "(dense, but 0.03 at base and far from the ceiling 1 at the budget; issue 29)",
                  ("reward.names=[digit_heavy]",)),
}

REFERENCE = "flow_grpo"  # the preset that defines each task's target
TOLERANCE = 1e-9         # a run "reaches" the target when eval ≥ target − TOLERANCE (float mean round-off)

RESULT_COLUMNS = ["task", "preset", "seed", "iterations", "status", "target", "base_eval_reward",
                  "final_eval_reward", "final_train_reward", "steps_to_target", "wall_s_to_target",
                  "nfe_to_target", "s_per_iteration", "nfe_per_image", "peak_rss_mb", "wall_s_total", "nfe_total"]
NUMERIC = RESULT_COLUMNS[6:]


# ----------------------------------------------------------------------------- run folders


@dataclass(frozen=True)
class Job:
    task: str
    preset: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.task}/{self.preset}/seed{self.seed}"


def run_dir(out: Path, job: Job) -> Path:
    return out / "runs" / job.task / job.preset / f"seed{job.seed}"


def log_stem(out: Path, job: Job) -> Path:
    return out / "logs" / job.task / job.preset / f"seed{job.seed}"


# ----------------------------------------------------------------------------- one run's numbers


def read_jsonl(path: Path) -> list[dict]:
    """metrics.jsonl lines; a torn last line (a run killed while writing) is ignored."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def eval_curve(rows: list[dict]) -> list[dict]:
    """Eval lines sorted by step, one per step (the last written wins)."""
    by_step = {r["step"]: r for r in rows if r.get("eval_reward_mean") is not None}
    return [by_step[s] for s in sorted(by_step)]


def is_finished(run_dir: Path, iterations: int) -> bool:
    return any(r["step"] == iterations for r in eval_curve(read_jsonl(run_dir / "metrics.jsonl")))


def first_reach(evals: list[dict], target: float | None) -> dict | None:
    """The first eval line (in step order) with eval_reward_mean ≥ target, or None."""
    if target is None:
        return None
    return next((r for r in evals if r["eval_reward_mean"] >= target - TOLERANCE), None)


def run_stats(rows: list[dict], iterations: int) -> dict:
    """The per-run columns that do not depend on the target (missing ones are None)."""
    evals = eval_curve(rows)
    train = sorted((r for r in rows if r.get("reward_mean") is not None), key=lambda r: r["step"])
    at = {r["step"]: r for r in evals}

    def mean_of(key):
        vals = [r[key] for r in train if r.get(key) is not None]
        return statistics.fmean(vals) if vals else None

    last = max(rows, key=lambda r: r.get("wall_s") or 0.0) if rows else {}
    return {
        "status": "ok" if iterations in at else ("unfinished" if rows else "missing"),
        "base_eval_reward": at[0]["eval_reward_mean"] if 0 in at else None,
        "final_eval_reward": at[iterations]["eval_reward_mean"] if iterations in at else None,
        "final_train_reward": train[-1]["reward_mean"] if train else None,
        "s_per_iteration": mean_of("time/iteration_s"),
        "nfe_per_image": mean_of("nfe_per_image"),
        "wall_s_total": last.get("wall_s"),
        "nfe_total": last.get("nfe"),
    }


def targets(rows: list[dict]) -> dict[tuple[str, int], float]:
    """(task, iterations) → mean final eval reward of the reference preset's finished seeds."""
    finals: dict[tuple[str, int], list[float]] = {}
    for r in rows:
        if r["preset"] == REFERENCE and r["final_eval_reward"] is not None:
            finals.setdefault((r["task"], r["iterations"]), []).append(r["final_eval_reward"])
    return {k: statistics.fmean(v) for k, v in finals.items()}


def fill_targets(rows: list[dict], curves: dict[tuple, list[dict]]) -> None:
    """Add target, steps_to_target, wall_s_to_target, nfe_to_target to each row in place."""
    tgt = targets(rows)
    for r in rows:
        t = tgt.get((r["task"], r["iterations"]))
        hit = first_reach(curves[(r["task"], r["preset"], r["seed"])], t)
        r["target"] = t
        r["steps_to_target"] = hit["step"] if hit else None
        r["wall_s_to_target"] = hit.get("wall_s") if hit else None
        r["nfe_to_target"] = hit.get("nfe") if hit else None


# ----------------------------------------------------------------------------- report


def collect(out: Path, jobs: list[Job], default_iterations: int | None) -> tuple[list[dict], dict]:
    """results rows (targets filled) and each run's eval curve, from the run folders."""
    import yaml

    rows, curves = [], {}
    for job in jobs:
        d = run_dir(out, job)
        iterations = default_iterations
        if (d / "config.yaml").exists():
            iterations = int(yaml.safe_load((d / "config.yaml").read_text())["train"]["iterations"])
        metrics = read_jsonl(d / "metrics.jsonl")
        ru_path = Path(f"{log_stem(out, job)}.json")
        ru = json.loads(ru_path.read_text()) if ru_path.exists() else {}
        row = {"task": job.task, "preset": job.preset, "seed": job.seed, "iterations": iterations,
               **run_stats(metrics, iterations if iterations is not None else -1), "peak_rss_mb": ru.get("peak_rss_mb")}
        if row["status"] != "ok" and ru.get("returncode", 0) != 0:
            row["status"] = "failed"
        rows.append(row)
        curves[(job.task, job.preset, job.seed)] = eval_curve(metrics)
    fill_targets(rows, curves)
    return rows, curves


def discover(out: Path) -> list[Job]:
    """Every DIR/runs/TASK/PRESET/seedS folder."""
    found = []
    for d in sorted((out / "runs").glob("*/*/seed*")):
        if d.is_dir() and d.name[4:].lstrip("-").isdigit():
            found.append(Job(d.parent.parent.name, d.parent.name, int(d.name[4:])))
    return found


def fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def write_csv(path: Path, rows: list[dict], columns: list[str] | None = None) -> None:
    """rows as CSV (columns: the first row's keys by default), the folder made if missing."""
    columns = columns or (list(rows[0]) if rows else [])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({c: fmt(r.get(c)) for c in columns})


def summarize(rows: list[dict]) -> list[dict]:
    """Per (task, preset, iterations): mean/std over seeds of each numeric column, reach fraction."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["preset"], r["iterations"]), []).append(r)
    out = []
    for (task, preset, iterations), rs in groups.items():
        s = {"task": task, "preset": preset, "iterations": iterations, "seeds": len(rs),
             "finished": sum(r["status"] == "ok" for r in rs), "target": rs[0]["target"]}
        for c in NUMERIC:
            vals = [r[c] for r in rs if r[c] is not None]
            s[f"{c}_mean"] = statistics.fmean(vals) if vals else None
            s[f"{c}_std"] = statistics.stdev(vals) if len(vals) > 1 else (0.0 if vals else None)
        reached = sum(r["steps_to_target"] is not None for r in rs)
        s["reached_fraction"] = reached / len(rs) if s["target"] is not None else None
        m = s["steps_to_target_mean"]  # a target exists only where flow_grpo ran this same budget
        s["steps_to_target_fraction_of_budget"] = m / iterations if m is not None else None
        out.append(s)
    return out


SUMMARY_COLUMNS = (["task", "preset", "iterations", "seeds", "finished", "target", "reached_fraction",
                    "steps_to_target_fraction_of_budget"] + [f"{c}_{s}" for c in NUMERIC for s in ("mean", "std")])


def pm(s: dict, c: str, digits: int) -> str:
    m, sd = s[f"{c}_mean"], s[f"{c}_std"]
    if m is None:
        return "–"
    return f"{m:.{digits}f} ± {sd:.{digits}f}" if sd else f"{m:.{digits}f}"


def machine() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        torch_v = version("torch")
    except PackageNotFoundError:
        torch_v = "?"
    cpus = os.cpu_count()
    proc = platform.processor() or platform.machine()
    return (f"{platform.system()} {platform.release()}, {proc}, {cpus} CPUs, Python {platform.python_version()}, "
            f"torch {torch_v}")


def write_summary_md(path: Path, summary: list[dict], cmdline: str) -> None:
    lines = [f"Command: `{cmdline}`  ", f"Date: {datetime.date.today().isoformat()}  ", f"Machine: {machine()}", ""]
    for task in sorted({s["task"] for s in summary}):
        rs = [s for s in summary if s["task"] == task]
        rs.sort(key=lambda s: (s["preset"] != REFERENCE, s["preset"], s["iterations"]))
        tgt = rs[0]["target"]
        desc = TASKS[task].description if task in TASKS else ""
        lines += [f"### {task}: {desc}", "",
                  f"Target: {REFERENCE} mean final eval reward = {tgt:.4f}" if tgt is not None
                  else f"Target: none ({REFERENCE} has no finished run)", "",
                  "| preset | iters | seeds | base eval | final eval | reached | iters to target (× budget) "
                  "| wall s to target | NFE to target | s / iter | NFE / image | peak RSS MB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for s in rs:
            frac = s["steps_to_target_fraction_of_budget"]
            reached = "–" if s["reached_fraction"] is None else f"{s['reached_fraction']:.0%}"
            steps = pm(s, "steps_to_target", 1) + (f" ({frac:.2f})" if frac is not None else "")
            lines.append(f"| {s['preset']} | {s['iterations']} | {s['finished']}/{s['seeds']} "
                         f"| {pm(s, 'base_eval_reward', 4)} | {pm(s, 'final_eval_reward', 4)} | {reached} | {steps} "
                         f"| {pm(s, 'wall_s_to_target', 1)} | {pm(s, 'nfe_to_target', 0)} "
                         f"| {pm(s, 's_per_iteration', 3)} | {pm(s, 'nfe_per_image', 1)} | {pm(s, 'peak_rss_mb', 0)} |")
        lines.append("")
    lines += ["Mean ± std over seeds. \"reached\": fraction of seeds whose eval reward reaches the target at some "
              "evaluation; iterations / wall s / NFE to target are averaged over the seeds that reach it.", ""]
    path.write_text("\n".join(lines))


def plot(out: Path, rows: list[dict], curves: dict) -> list[Path]:
    """plots/TASK_vs_{iterations,wall,nfe}.png: eval reward, mean over seeds, its 95% bootstrap
    interval shaded (flowpo.bench.stats.band)."""
    from flowpo.bench.stats import band

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "plots").mkdir(parents=True, exist_ok=True)
    written = []
    for task in sorted({r["task"] for r in rows}):
        presets = sorted({r["preset"] for r in rows if r["task"] == task}, key=lambda p: (p != REFERENCE, p))
        tgt = next((r["target"] for r in rows if r["task"] == task and r["target"] is not None), None)
        for axis, key, label in (("iterations", "step", "iteration"), ("wall", "wall_s", "wall time (s)"),
                                 ("nfe", "nfe", "model evaluations (NFE)")):
            many = len(presets) > 10  # the legend then goes beside the axes, not over the curves
            fig, ax = plt.subplots(figsize=(9.5 if many else 7, 4.8 if many else 4.2))
            for i, preset in enumerate(presets):
                runs = [curves[(task, preset, r["seed"])] for r in rows
                        if r["task"] == task and r["preset"] == preset and curves[(task, preset, r["seed"])]]
                if not runs:
                    continue
                steps = sorted(set.intersection(*({e["step"] for e in c} for c in runs)))
                at = [{e["step"]: e for e in c} for c in runs]
                x = [statistics.fmean(a[s].get(key) or 0.0 for a in at) for s in steps]
                ys = [[a[s]["eval_reward_mean"] for a in at] for s in steps]
                # ten colours, then the same colours dashed with square markers: no two presets look alike
                line, = ax.plot(x, [statistics.fmean(y) for y in ys], "o-" if i < 10 else "s--", ms=3,
                                color=f"C{i % 10}", lw=2.2 if preset == REFERENCE else 1.4,
                                label=f"{preset} ({len(runs)} seeds)")
                if len(runs) > 1:
                    lo_hi = [band(y) for y in ys]
                    ax.fill_between(x, [b[0] for b in lo_hi], [b[1] for b in lo_hi], color=line.get_color(), alpha=0.15)
            if tgt is not None:
                ax.axhline(tgt, ls="--", color="k", lw=1, label=f"target ({REFERENCE} final mean)")
            ax.set_xlabel(label)
            ax.set_ylabel("eval reward")
            ax.set_title(f"{task}: eval reward vs {label} (mean, 95% bootstrap CI over seeds)", fontsize=10)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, **({"loc": "center left", "bbox_to_anchor": (1.01, 0.5)} if many else {}))
            ax.grid(alpha=0.3)
            fig.tight_layout()
            path = out / "plots" / f"{task}_vs_{axis}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def report(out: Path, jobs: list[Job], iterations: int | None, cmdline: str, lr: dict | None = None) -> list[dict]:
    """results.csv, summary.csv/.md, race.csv/.md (bootstrap intervals, censored runs: flowpo.bench.stats)
    and plots/ from the run folders of `jobs`. `lr`: (task, preset) → tuned point, shown in race.md."""
    from flowpo.bench.stats import RACE_COLUMNS, race, write_race_md

    rows, curves = collect(out, jobs, iterations)
    rows.sort(key=lambda r: (r["task"], r["preset"] != REFERENCE, r["preset"], r["seed"]))
    write_csv(out / "results.csv", rows, RESULT_COLUMNS)
    summary = summarize(rows)
    write_csv(out / "summary.csv", summary, SUMMARY_COLUMNS)
    write_summary_md(out / "summary.md", summary, cmdline)
    table = race(rows)
    write_csv(out / "race.csv", table, RACE_COLUMNS)
    write_race_md(out / "race.md", table, cmdline, REFERENCE, lr)
    plot(out, rows, curves)
    print(f"bench: wrote {out / 'results.csv'} ({len(rows)} rows), summary.csv/.md, race.csv/.md, plots/", flush=True)
    return rows
