"""s / iteration of the same presets on two source trees, interleaved A B B A … (a refactor's cost).

    git worktree add --detach /tmp/before <commit>
    python benchmarks/ab_trees.py --a /tmp/before --b . --presets flow_grpo,op_grpo,stepwise_grpo,awm \
        --pairs 3 --rounds 3 --out runs/ab

Each turn is one process of `benchmarks/timing.py` (this tree's copy) with PYTHONPATH at the
tree's src, train.threads=1, a warm-up iteration and `--rounds` timed iterations of every preset
round-robin. Turns alternate A B, B A, … so that drift in the machine's load hits both alike.
Prints the median s / iteration per tree and preset and the B ÷ A ratio of the medians, with the
machine's load average before and after; writes `ab.csv` (one row per timed iteration).
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def turn(tree: Path, presets: str, rounds: int, extra: list[str]) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "PYTHONPATH": str(tree / "src"), "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, str(HERE / "timing.py"), "--presets", presets, "--rounds", str(rounds),
                        "--out", out, "train.threads=1", *extra], env=env, check=True, stdout=subprocess.DEVNULL)
        with open(Path(out) / "timing.csv") as f:
            return list(csv.DictReader(f))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="tree A (the baseline)")
    ap.add_argument("--b", required=True, help="tree B")
    ap.add_argument("--presets", default="flow_grpo,op_grpo,stepwise_grpo,awm")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="runs/ab")
    args, extra = ap.parse_known_args()
    trees = {"A": Path(args.a).resolve(), "B": Path(args.b).resolve()}
    load0 = os.getloadavg()
    rows = []
    for k in range(args.pairs):
        for name in (("A", "B") if k % 2 == 0 else ("B", "A")):
            for r in turn(trees[name], args.presets, args.rounds, extra):
                rows.append({"tree": name, "pair": k, "preset": r["preset"], "s_per_iteration": float(r["s_per_iteration"])})
            print(f"pair {k} tree {name} done", flush=True)
    load1 = os.getloadavg()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "ab.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"load average (1, 5, 15 min) before {load0}, after {load1}")
    print("| preset | A s/it (median) | B s/it (median) | B ÷ A |\n|---|---|---|---|")
    for p in args.presets.split(","):
        a = statistics.median(r["s_per_iteration"] for r in rows if r["tree"] == "A" and r["preset"] == p)
        b = statistics.median(r["s_per_iteration"] for r in rows if r["tree"] == "B" and r["preset"] == p)
        print(f"| {p} | {a:.3f} | {b:.3f} | {b / a:.3f} |")


if __name__ == "__main__":
    main()
