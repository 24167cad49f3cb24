"""Side-by-side cost per iteration of the presets, and the framework overhead.

    python benchmarks/timing.py --presets dance_grpo,mix_grpo,mix_grpo_flash,mix_grpo_flash_star \
        --rounds 6 --out runs/timing [key=value ...]

All presets live in one process and run one iteration each in turn (round-robin, after a warm-up
iteration), so machine-load drift hits them alike; ratios are taken within this one run. For each
iteration it records wall time, model evaluations (nfe) per image, and the time spent inside the
model's forward passes (a timer around the policy network's `forward`) and inside `backward()`
(a timer around `torch.Tensor.backward`). Framework overhead = 1 − (forward + backward)/iteration.
Reward scoring and decoding count as overhead here (they are not the policy's passes).

On a GPU (`model.device=cuda`) every timer synchronises the device before reading the clock, so
the forward/backward times are the kernels' and not just their launches (the synchronisation
itself slows the iteration a little); peak GPU memory per iteration goes into the table.
"""
from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from flowpo import config
from flowpo.training.trainer import Trainer


def _sync() -> None:
    """Wait for queued GPU work, so a CPU clock reading covers it (no-op without CUDA)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class Timers:
    def __init__(self) -> None:
        self.fwd = 0.0
        self.bwd = 0.0


def instrument(tr: Trainer, timers: Timers) -> None:
    net = tr.policy.module
    orig_forward = net.forward

    def timed_forward(*a, **k):
        _sync()
        t = time.perf_counter()
        out = orig_forward(*a, **k)
        _sync()
        timers.fwd += time.perf_counter() - t
        return out

    net.forward = timed_forward


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="flow_grpo,dance_grpo,mix_grpo,mix_grpo_flash,mix_grpo_flash_star,op_grpo,"
                                         "stepwise_grpo")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="runs/timing")
    args, rest = ap.parse_known_args(argv)
    presets = [p for p in args.presets.split(",") if p]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="flowpo-timing-"))
    timers = {p: Timers() for p in presets}
    trainers = {}
    for p in presets:
        cfg = config.load(None, p, ["log.tensorboard=false", "log.progress=false", "log.grids=false"] + rest)
        trainers[p] = Trainer(cfg, tmp / p)
        instrument(trainers[p], timers[p])
    orig_backward = torch.Tensor.backward
    current = {"p": None}

    def timed_backward(self, *a, **k):
        _sync()
        t = time.perf_counter()
        r = orig_backward(self, *a, **k)
        _sync()
        timers[current["p"]].bwd += time.perf_counter() - t
        return r

    torch.Tensor.backward = timed_backward
    rows = []
    try:
        for rnd in range(args.rounds + 1):
            for p in presets:
                tr, tm = trainers[p], timers[p]
                tm.fwd = tm.bwd = 0.0
                current["p"] = p
                # the forward timer also runs inside backward's recomputation-free autograd: none here
                gpu = torch.cuda.is_available() and tr.device.type == "cuda"
                if gpu:
                    torch.cuda.reset_peak_memory_stats(tr.device)
                _sync()
                t0 = time.perf_counter()
                rec = tr.train_iteration(rnd)
                _sync()
                dt = time.perf_counter() - t0
                peak = torch.cuda.max_memory_allocated(tr.device) / 2**20 if gpu else float("nan")
                if rnd == 0:
                    continue  # warm-up
                rows.append({"preset": p, "round": rnd, "s_per_iteration": dt, "nfe_per_image": rec["nfe_per_image"],
                             "forward_s": tm.fwd, "backward_s": tm.bwd,
                             "model_share": (tm.fwd + tm.bwd) / dt,
                             "rollout_s": rec["time/rollout_s"], "update_s": rec["time/update_s"],
                             "reward_s": rec["time/reward_s"], "peak_gpu_mib": peak})
                print(f"round {rnd} {p:<20} {dt:6.2f} s  nfe/img {rec['nfe_per_image']:6.1f}  "
                      f"model share {(tm.fwd + tm.bwd) / dt:5.1%}", flush=True)
    finally:
        torch.Tensor.backward = orig_backward
    with open(out / "timing.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    ref = "dance_grpo" if "dance_grpo" in presets else presets[0]
    med = {p: statistics.median(r["s_per_iteration"] for r in rows if r["preset"] == p) for p in presets}
    lines = [f"| preset | s / iteration (median of {args.rounds}) | × {ref} | nfe / image | × {ref} | "
             "forward+backward share | peak GPU MiB |", "|---|---|---|---|---|---|---|"]
    nfe = {p: statistics.mean(r["nfe_per_image"] for r in rows if r["preset"] == p) for p in presets}
    for p in presets:
        share = statistics.median(r["model_share"] for r in rows if r["preset"] == p)
        peak = max(r["peak_gpu_mib"] for r in rows if r["preset"] == p)
        lines.append(f"| {p} | {med[p]:.3f} | {med[p] / med[ref]:.2f} | {nfe[p]:.1f} | {nfe[p] / nfe[ref]:.2f} | "
                     f"{share:.1%} | {'–' if math.isnan(peak) else f'{peak:.0f}'} |")
    text = "\n".join(lines)
    dev = next(iter(trainers.values())).device
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    (out / "timing.md").write_text(f"command: {' '.join(sys.argv)}\ndevice: {where}; torch {torch.__version__}\n\n"
                                   f"{text}\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
