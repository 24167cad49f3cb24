"""Race statistics over seeds (issue 29): per (task, preset) the mean and a 95% bootstrap interval of
iterations-to-target and wall-time-to-target, and the share of seeds that reach the target.

Runs that never reach the target are counted, not dropped: they are **censored at the budget**, i.e.
they enter iterations-to-target as the iteration budget and wall-time-to-target as the run's whole
wall time. A mean with censored runs is therefore a lower bound on the true mean (the run would
have needed more), and the table says how many runs were censored. Runs that did not finish (failed
or interrupted) are not outcomes of the method: they are listed apart and enter no statistic.

Bootstrap: the percentile interval of the mean over 10 000 resamples of the seeds (with
replacement), from a fixed generator, so a report is reproducible. With one seed the interval is
that seed's value.
"""
from __future__ import annotations

import random
import statistics
from pathlib import Path

LEVEL = 0.95
RESAMPLES = 10_000


def bootstrap_ci(values: list[float], level: float = LEVEL, resamples: int = RESAMPLES,
                 seed: int = 0) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean of `values` (None when empty)."""
    if not values:
        return None
    if len(values) == 1:
        return (values[0], values[0])
    rng = random.Random(seed)
    n = len(values)
    means = sorted(statistics.fmean(rng.choices(values, k=n)) for _ in range(resamples))
    lo = means[int((1 - level) / 2 * resamples)]
    hi = means[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return (lo, hi)


def censored(row: dict) -> tuple[float | None, float | None, bool]:
    """(iterations to target, wall s to target, censored) of a finished run: the budget and the run's
    whole wall time where it never reached the target."""
    if row["steps_to_target"] is not None:
        return float(row["steps_to_target"]), row["wall_s_to_target"], False
    return float(row["iterations"]), row["wall_s_total"], True


def race(rows: list[dict]) -> list[dict]:
    """Per (task, preset, iterations) over the finished runs with a target: n, reached, censored,
    mean and interval of iterations/wall to target and of the final eval reward."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["preset"], r["iterations"]), []).append(r)
    out = []
    for (task, preset, iterations), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or 0)):
        done = [r for r in rs if r["status"] == "ok" and r["target"] is not None]
        s = {"task": task, "preset": preset, "iterations": iterations, "target": rs[0]["target"], "seeds": len(done),
             "unfinished": len(rs) - sum(r["status"] == "ok" for r in rs)}
        its, walls, cens = [], [], 0
        for r in done:
            i, w, c = censored(r)
            its.append(i)
            cens += c
            if w is not None:
                walls.append(w)
        s["reached"] = len(done) - cens
        s["reached_share"] = (len(done) - cens) / len(done) if done else None
        s["censored"] = cens
        finals = [r["final_eval_reward"] for r in done if r["final_eval_reward"] is not None]
        for key, vals in (("iters_to_target", its), ("wall_s_to_target", walls), ("final_eval", finals)):
            ci = bootstrap_ci(vals)
            s[f"{key}_mean"] = statistics.fmean(vals) if vals else None
            s[f"{key}_lo"], s[f"{key}_hi"] = ci if ci else (None, None)
        out.append(s)
    return out


RACE_COLUMNS = ["task", "preset", "iterations", "target", "seeds", "unfinished", "reached", "reached_share",
                "censored"] + [f"{k}_{x}" for k in ("iters_to_target", "wall_s_to_target", "final_eval")
                               for x in ("mean", "lo", "hi")]


def _ci(s: dict, key: str, digits: int) -> str:
    m = s[f"{key}_mean"]
    if m is None:
        return "–"
    return f"{m:.{digits}f} [{s[f'{key}_lo']:.{digits}f}, {s[f'{key}_hi']:.{digits}f}]"


def write_race_md(path: Path, table: list[dict], cmdline: str, reference: str, lr: dict | None = None) -> None:
    """race.md: one table per task; `lr` ((task, preset) → chosen point) adds a column (flowpo tune)."""
    lines = [f"Command: `{cmdline}`", ""]
    for task in sorted({s["task"] for s in table}):
        rs = sorted((s for s in table if s["task"] == task), key=lambda s: (s["preset"] != reference, s["preset"]))
        tgt = rs[0]["target"]
        ref = next((s for s in rs if s["preset"] == reference), None)
        lines += [f"### {task}", "", f"Target: {reference}'s mean final eval reward = {tgt:.4f}" if tgt is not None
                  else f"Target: none ({reference} has no finished run)", "",
                  "| preset |" + (" tuned |" if lr else "") + " seeds | reached | iterations to target [95% CI] "
                  "| × flow_grpo | wall s to target [95% CI] | final eval [95% CI] |",
                  "|---|" + ("---|" if lr else "") + "---|---|---|---|---|---|"]
        for s in rs:
            ratio = (f"{s['iters_to_target_mean'] / ref['iters_to_target_mean']:.2f}"
                     if ref and ref["iters_to_target_mean"] and s["iters_to_target_mean"] is not None else "–")
            extra = f" {lr.get((task, s['preset']), '–')} |" if lr else ""
            unf = f" ({s['unfinished']} unfinished)" if s["unfinished"] else ""
            lines.append(f"| {s['preset']} |{extra} {s['seeds']}{unf} | {s['reached']}/{s['seeds']} "
                         f"| {_ci(s, 'iters_to_target', 1)} | {ratio} | {_ci(s, 'wall_s_to_target', 1)} "
                         f"| {_ci(s, 'final_eval', 4)} |")
        lines.append("")
    lines += ["Mean over the finished seeds with a 95% percentile-bootstrap interval (10 000 resamples). Runs that "
              "never reach the target are censored at the budget (iterations = the budget, wall = the run's whole "
              "wall time), so a mean with censored runs is a lower bound; \"reached\" counts the seeds that reach "
              "the target. × flow_grpo: ratio of the mean iterations to target.", ""]
    Path(path).write_text("\n".join(lines))


def band(values: list[float]) -> tuple[float, float]:
    """The shaded band of a plot: the 95% bootstrap interval of the mean (fewer resamples: a picture)."""
    return bootstrap_ci(values, resamples=2000) or (float("nan"), float("nan"))
