"""BENCHMARKS.md §1's table for one task, built from a race's csv files (never typed by hand).

Reads race.csv and summary.csv (from `flowpo tune`'s held-out report) and choice.csv (its choice),
and prints one markdown row per preset, sorted by iterations to target, then wall time:

    python benchmarks/race_table.py benchmarks/race_heavy --task heavy
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

_SHORT = {"train.lr": "", "objective.nft_beta": "β = "}


def _point(point: str) -> str:
    """'train.lr=1e-2 objective.nft_beta=1' → '1e-2 β = 1'."""
    parts = []
    for kv in point.split():
        key, _, val = kv.partition("=")
        parts.append(_SHORT.get(key, key + "=") + val)
    return " ".join(parts)


def _rows(path: Path, task: str) -> dict[str, dict]:
    with path.open() as f:
        return {r["preset"]: r for r in csv.DictReader(f) if r["task"] == task}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="holds race.csv, summary.csv and choice.csv")
    ap.add_argument("--task", required=True)
    ap.add_argument("--reference", default="flow_grpo", help="the preset whose iterations the ratio divides by")
    args = ap.parse_args()
    race, summary = _rows(args.folder / "race.csv", args.task), _rows(args.folder / "summary.csv", args.task)
    with (args.folder / "choice.csv").open() as f:
        chosen = {r["preset"]: _point(r["point"]) for r in csv.DictReader(f)
                  if r["task"] == args.task and r["chosen"] == "True"}
    if args.reference not in race:
        raise SystemExit(f"{args.reference} has no row for task {args.task} in {args.folder / 'race.csv'}")
    ref = float(race[args.reference]["iters_to_target_mean"])
    print("| method | tuned | seeds reaching target | iterations to target [95% CI] | × " + args.reference
          + " | wall s to target [95% CI] | final eval [95% CI] | s / iteration |")
    print("|---|---|---|---|---|---|---|---|")
    order = sorted(race, key=lambda p: (float(race[p]["iters_to_target_mean"]), float(race[p]["wall_s_to_target_mean"])))
    for p in order:
        r = race[p]
        it, lo, hi = (float(r[k]) for k in ("iters_to_target_mean", "iters_to_target_lo", "iters_to_target_hi"))
        cens = int(r["censored"])
        iters = f"{it:.1f} [{lo:.1f}, {hi:.1f}]"
        if cens == int(r["seeds"]):
            iters = f"≥ {iters} (censored)"
        elif cens:
            iters += f", {cens} censored"
        wall = "{:.1f} [{:.1f}, {:.1f}]".format(*(float(r[k]) for k in ("wall_s_to_target_mean", "wall_s_to_target_lo",
                                                                         "wall_s_to_target_hi")))
        final = "{:.3f} [{:.3f}, {:.3f}]".format(*(float(r[k]) for k in ("final_eval_mean", "final_eval_lo",
                                                                          "final_eval_hi")))
        spi = float(summary[p]["s_per_iteration_mean"]) if p in summary else float("nan")
        print(f"| {p} | {chosen.get(p, '?')} | {r['reached']}/{r['seeds']} | {iters} | {it / ref:.2f} | {wall} "
              f"| {final} | {spi:.2f} |")


if __name__ == "__main__":
    main()
