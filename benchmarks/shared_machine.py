"""`flowpo train` alone and beside a competing CPU-bound process, for a few thread settings.

    python benchmarks/shared_machine.py --iterations 4 --repeats 2 --out runs/shared

On a small machine another busy process (a second run, a test suite, a compiler) takes a core.
torch's OpenMP threads then wait for the one that shares its core at every parallel region, and
libgomp's default wait policy spins while it waits, so a 2-thread run on 2 cores can crawl. Each
setting below runs the embedded default (flow_grpo) as a subprocess, alone and with one
`while True: pass` process beside it; the table gives the median s / iteration (metrics.jsonl's
time/iteration_s, the first iteration dropped). Settings, all in one script, interleaved:

    2 threads, libgomp default   train.threads=2: torch's default on 2 cores (flowpo before issue
                                 33's default); libgomp spins a while before a waiting thread sleeps
    2 threads, passive           OMP_WAIT_POLICY=PASSIVE: waiting threads sleep at once
    2 threads, spin 10k / 1M     GOMP_SPINCOUNT: how long a waiting thread spins
    1 thread                     train.threads=1: the default on 2 cores since issue 33 (every
                                 usable core but one, flowpo.parts.resolve_threads)
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SETTINGS = {
    "2 threads, libgomp default": ({}, ["train.threads=2"]),
    "2 threads, passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, ["train.threads=2"]),
    "2 threads, spin 10k": ({"GOMP_SPINCOUNT": "10000"}, ["train.threads=2"]),
    "2 threads, spin 1M": ({"GOMP_SPINCOUNT": "1000000"}, ["train.threads=2"]),
    "1 thread (default on 2 cores)": ({}, ["train.threads=0"]),
}


def run(env_changes: dict, overrides: list[str], iterations: int) -> list[float]:
    env = {**os.environ}
    for k, v in env_changes.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "flowpo", "train", "--out", f"{tmp}/r", f"train.iterations={iterations}",
                        "eval.every=0", "eval.prompts=4", "log.progress=false", "log.tensorboard=false",
                        "log.grids=false", "train.checkpoint_every=0", *overrides],
                       env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rows = [json.loads(x) for x in Path(f"{tmp}/r/metrics.jsonl").read_text().splitlines()]
    return [r["time/iteration_s"] for r in rows if "time/iteration_s" in r][1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="runs/shared")
    args = ap.parse_args()
    rows = []
    print(f"cores: {os.cpu_count()}, load before: {os.getloadavg()}", flush=True)
    for rep in range(args.repeats):
        for busy in (False, True):
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
            try:
                for name, (env, ov) in SETTINGS.items():
                    for s in run(env, ov, args.iterations):
                        rows.append({"setting": name, "competitor": busy, "repeat": rep, "s_per_iteration": s})
                    print(f"repeat {rep} competitor={busy} {name} done", flush=True)
            finally:
                if hog is not None:
                    hog.kill()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "shared_machine.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print("| setting | alone s/it | beside a busy process s/it | slowdown |\n|---|---|---|---|")
    for name in SETTINGS:
        a = statistics.median(r["s_per_iteration"] for r in rows if r["setting"] == name and not r["competitor"])
        b = statistics.median(r["s_per_iteration"] for r in rows if r["setting"] == name and r["competitor"])
        print(f"| {name} | {a:.3f} | {b:.3f} | {b / a:.2f}× |")


if __name__ == "__main__":
    main()
