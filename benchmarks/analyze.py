"""Per-method diagnostics from a `flowpo bench` folder: Stepwise's per-step |gain| profile and
OP-GRPO's replay statistics, averaged over iterations and seeds.

    python benchmarks/analyze.py runs/bench
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def gain_profile(bench: Path, task: str, preset: str) -> list[float] | None:
    profs = []
    for m in sorted((bench / "runs" / task / preset).glob("seed*/metrics.jsonl")):
        profs += [r["stepwise/mean_abs_gain_by_step"] for r in rows(m) if "stepwise/mean_abs_gain_by_step" in r]
    if not profs:
        return None
    return [statistics.mean(p[t] for p in profs) for t in range(len(profs[0]))]


def replay_stats(bench: Path, task: str, preset: str) -> dict | None:
    keys = ["replay/admitted", "replay/w_mean", "replay/w_max", "replay/capped_frac", "replay/ess",
            "replay/age_mean", "replay/entries", "replay/bytes", "replay/bytes_per_trajectory"]
    vals: dict[str, list[float]] = {k: [] for k in keys}
    for m in sorted((bench / "runs" / task / preset).glob("seed*/metrics.jsonl")):
        for r in rows(m):
            for k in keys:
                if k in r and r[k] is not None:
                    vals[k].append(float(r[k]))
    if not vals["replay/admitted"]:
        return None
    return {k: (statistics.mean(v) if v else float("nan")) for k, v in vals.items()}


def main(argv: list[str]) -> int:
    bench = Path(argv[0] if argv else "runs/bench")
    for task_dir in sorted((bench / "runs").iterdir()):
        task = task_dir.name
        for preset_dir in sorted(task_dir.iterdir()):
            preset = preset_dir.name
            prof = gain_profile(bench, task, preset)
            if prof:
                total = sum(prof) or 1.0
                print(f"{task}/{preset}: mean |gain| by step t (share of the total): " +
                      ", ".join(f"t{t}: {g:.4f} ({g / total:.0%})" for t, g in enumerate(prof)))
            rs = replay_stats(bench, task, preset)
            if rs:
                print(f"{task}/{preset}: " + ", ".join(f"{k.split('/')[1]}={v:.6g}" for k, v in rs.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
