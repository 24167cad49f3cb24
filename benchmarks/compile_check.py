"""model.compile on this machine: compile time, recompilations per iteration, s / iteration and
the weight difference against eager, side by side in one process.

    python benchmarks/compile_check.py [--preset flow_grpo] [--iterations 4] [key=value ...]

Runs the preset eagerly, then with the repeated blocks compiled (flowpo.regional, inductor),
`--iterations` iterations each from the same seed, 1 thread. Prints per iteration the wall time
and dynamo's compiled-frame count (a recompilation adds one), the compile time (the first
compiled iteration's wall time minus the first eager one's) and the largest |Δ| between the two
runs' trained weights.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch


def run(preset: str, iterations: int, overrides: list[str], compiled: bool) -> dict:
    from flowpo import config
    from flowpo.regional import compile_blocks, compiled_frames
    from flowpo.training.trainer import Trainer

    cfg = config.load(None, preset, ["eval.every=0", "train.checkpoint_every=0", "log.progress=false",
                                     "log.tensorboard=false", "train.threads=1", f"train.iterations={iterations}",
                                     *overrides])
    with tempfile.TemporaryDirectory() as d:
        tr = Trainer(cfg, d)
        blocks = compile_blocks(tr.policy.module) if compiled else 0
        its = []
        for i in range(iterations):
            t = time.perf_counter()
            tr.train_iteration(i)
            tr.iteration = i + 1
            its.append({"s": round(time.perf_counter() - t, 3), "frames": compiled_frames()})
        return {"compiled": compiled, "blocks": blocks, "iterations": its,
                "weights": {k: v.clone() for k, v in tr.policy.trainable_state_dict().items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="flow_grpo")
    ap.add_argument("--iterations", type=int, default=4)
    args, overrides = ap.parse_known_args()
    torch.set_num_threads(1)
    load0 = os.getloadavg()
    eager = run(args.preset, args.iterations, overrides, False)
    comp = run(args.preset, args.iterations, overrides, True)
    diff = max(float((eager["weights"][k] - comp["weights"][k]).abs().max()) for k in eager["weights"])
    for r in (eager, comp):
        r.pop("weights")
        print(json.dumps(r))
    first = comp["iterations"][0]["s"] - eager["iterations"][0]["s"]  # what compiling cost (iteration 0)
    print(json.dumps({"preset": args.preset, "compile_s": round(first, 1), "max_abs_weight_diff": diff, "load_before": load0,
                      "load_after": os.getloadavg(), "overrides": overrides}))


if __name__ == "__main__":
    sys.exit(main())
