"""OP-GRPO's replay diagnostics per iteration, from a `flowpo bench` folder: zero-spread groups,
buffer hit rate, replayed rows admitted, and the importance-weight distribution (10/50/90th
percentiles of the sequence weight), mean over seeds, per task and preset; plus each seed's
iterations to the task's target as a ratio of flow_grpo's.

    python benchmarks/op_grpo_diagnostics.py --bench runs/bench19 [--bench more…] --out benchmarks/op_grpo

Writes OUT.csv (one row per task × preset × iteration), OUT_ratios.csv (per task × preset × seed),
OUT_curve_ratios.csv (on the seed-mean eval curves: iterations to reach flow_grpo's reward at
iteration k, over k, interpolated between evaluations) and OUT.png (one column per task).
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from flowpo.bench.report import write_csv

KEYS = ("groups/zero_spread", "replay/hit_rate", "replay/admitted", "replay/rescued_groups", "replay/w_p10", "replay/w_p50", "replay/w_p90",
        "reward_mean")


def _runs(bench: Path):
    for f in sorted(bench.glob("runs/*/*/seed*/metrics.jsonl")):
        task, preset, seed = f.parts[-4], f.parts[-3], int(f.parts[-2][4:])
        rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        yield task, preset, seed, rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bench", action="append", required=True, help="a flowpo bench --out folder (repeatable)")
    ap.add_argument("--out", default="benchmarks/op_grpo")
    ap.add_argument("--tasks", default="", help="comma-separated tasks to keep (default: all found)")
    args = ap.parse_args(argv)
    keep = {t for t in args.tasks.split(",") if t}
    curves: dict = {}
    evals: dict = {}
    for b in args.bench:
        for task, preset, seed, rows in _runs(Path(b)):
            if keep and task not in keep:
                continue
            train = [r for r in rows if "reward_mean" in r]
            for r in train:
                for k in KEYS:
                    if r.get(k) is not None:
                        curves.setdefault((task, preset, k), {}).setdefault(r["step"], []).append(float(r[k]))
            evals[(task, preset, seed)] = [(int(r["step"]), float(r["eval_reward_mean"])) for r in rows
                                           if "eval_reward_mean" in r]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "preset", "key", "iteration", "mean_over_seeds", "seeds"])
        for (task, preset, k), by_it in sorted(curves.items()):
            for it, vals in sorted(by_it.items()):
                w.writerow([task, preset, k, it, round(sum(vals) / len(vals), 6), len(vals)])
    # iterations to target: the first evaluation at or above flow_grpo's mean final eval reward
    ratios = []
    for task in sorted({t for t, _, _ in evals}):
        ref = [v[-1][1] for (t, p, _), v in evals.items() if t == task and p == "flow_grpo" and v]
        if not ref:
            continue
        target = sum(ref) / len(ref)

        def steps(v):
            return next((s for s, e in v if e >= target - 1e-9), None)

        ref_steps = {s: steps(v) for (t, p, s), v in evals.items() if t == task and p == "flow_grpo"}
        for (t, p, s), v in sorted(evals.items()):
            if t != task:
                continue
            st, rs = steps(v), ref_steps.get(s)
            ratios.append(dict(task=t, preset=p, seed=s, target=round(target, 4), base=v[0][1] if v else None,
                               final=v[-1][1] if v else None, steps_to_target=st, flow_grpo_steps=rs,
                               ratio=None if st is None or not rs else round(st / rs, 4)))
    write_csv(Path(str(out) + "_ratios.csv"), ratios)
    # the same on the seed-mean eval curves, interpolated between evaluations: the iterations a
    # preset needs to reach flow_grpo's mean eval reward at iteration k, divided by k
    curve_rows = []
    for task in sorted({t for t, _, _ in evals}):
        mean_curve = {}
        for (t, p, _), v in evals.items():
            if t == task:
                for st, e in v:
                    mean_curve.setdefault(p, {}).setdefault(st, []).append(e)
        mean_curve = {p: sorted((st, sum(es) / len(es)) for st, es in c.items()) for p, c in mean_curve.items()}
        ref = dict(mean_curve.get("flow_grpo", []))
        for p, c in sorted(mean_curve.items()):
            for k in sorted(ref):
                if k == 0 or ref[k] <= ref[0]:
                    continue
                reach = None
                for (s0, e0), (s1, e1) in zip(c, c[1:]):
                    if e1 >= ref[k] - 1e-9:
                        reach = s0 + (s1 - s0) * (0.0 if e0 >= ref[k] else (ref[k] - e0) / (e1 - e0))
                        break
                curve_rows.append(dict(task=task, preset=p, flow_grpo_iteration=k, target=round(ref[k], 4),
                                       iterations=None if reach is None else round(reach, 2),
                                       ratio=None if reach is None else round(reach / k, 3)))
    write_csv(Path(str(out) + "_curve_ratios.csv"), curve_rows)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        print("matplotlib missing: no plot")
        return 0
    tasks = sorted({t for t, _, _ in curves})
    presets = sorted({p for _, p, _ in curves})
    color = {p: plt.get_cmap("tab10")(i % 10) for i, p in enumerate(presets)}
    rows_k = ("groups/zero_spread", "replay/hit_rate", "replay/admitted", "replay/w_p50")
    fig, axes = plt.subplots(len(rows_k), len(tasks), figsize=(4.2 * len(tasks), 2.6 * len(rows_k)), squeeze=False)
    for j, task in enumerate(tasks):
        for i, k in enumerate(rows_k):
            ax = axes[i][j]
            for (t, preset, kk), by_it in sorted(curves.items()):
                if t != task or kk != k:
                    continue
                its = sorted(by_it)
                ax.plot(its, [sum(by_it[x]) / len(by_it[x]) for x in its], label=preset, lw=1.2, color=color[preset])
                if k == "replay/w_p50":
                    lo = curves.get((t, preset, "replay/w_p10"), {})
                    hi = curves.get((t, preset, "replay/w_p90"), {})
                    xs = [x for x in its if x in lo and x in hi]
                    ax.fill_between(xs, [sum(lo[x]) / len(lo[x]) for x in xs], [sum(hi[x]) / len(hi[x]) for x in xs],
                                    alpha=0.15, color=color[preset])
            ax.set_title(f"{task}: {k}", fontsize=9)
            ax.tick_params(labelsize=7)
    for j in range(len(tasks)):
        axes[0][j].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    print(f"wrote {out.with_suffix('.csv')}, {out}_ratios.csv, {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
