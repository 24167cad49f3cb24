"""MixGRPO-Flash's post-window solver: MixGRPO's code (int((n+1)·r̃) − 1 steps, history kept) against
flowpo's first reading (⌈n·r̃⌉ steps, restarted at first order), by the error of the final latent.

    python benchmarks/flash_tail_accuracy.py [--out benchmarks/flash_tail_accuracy.csv]

The embedded base model, 64 prompts × 1 sample, ODE everywhere (so only the tail differs): the grid
steps 0 … e − 1 one by one (Euler, the history recorded as the rollout does), then each tail from
σ_e to 0; the reference is 400 Euler steps from the same x at σ_e. Error: RMS over the latent of
(tail − reference), mean over samples; with the model calls the tail took.
"""
from __future__ import annotations

import argparse
import csv

import torch

from flowpo.policy.embedded import EmbeddedPolicy
from flowpo.embedded.prompts import train_prompts
from flowpo.rollout import chunked_velocity
from flowpo.schedule import sigmas as make_sigmas
from flowpo.solvers import Multistep, compressed_sigmas, compressed_steps, solve


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/flash_tail_accuracy.csv")
    args = ap.parse_args()
    torch.manual_seed(0)
    policy = EmbeddedPolicy(mode="lora")
    prompts = [train_prompts(d % 10)[0] for d in range(64)]
    cond = policy.encode_prompts(prompts)
    vel = chunked_velocity(policy, cond, [torch.arange(64)], 1.0)
    rows = []
    for T, r in ((10, 0.4), (10, 0.2), (25, 0.4)):
        grid = make_sigmas(T, 3.0)
        for e in (2, 4, 6):
            x = torch.randn(64, *policy.latent_shape)
            hist = Multistep()
            with torch.no_grad():
                for t in range(e):
                    s, s2 = float(grid[t]), float(grid[t + 1])
                    v = vel(x, torch.full((64,), s))
                    hist.step(x, v, s, s2)
                    x = x + (s2 - s) * v
                n = T - e
                ref, _ = solve("euler", vel, x, compressed_sigmas(float(grid[e]), 0.0, 400, 3.0))
                for rule in ("mixgrpo", "ceil"):
                    k = compressed_steps(n, r, rule)
                    seg = compressed_sigmas(float(grid[e]), 0.0, k, 3.0)
                    for warm in (True, False):
                        out, _ = solve("dpm2m", vel, x, seg, hist.history if warm else None)
                        err = (out - ref).flatten(1).pow(2).mean(1).sqrt().mean().item()
                        rows.append({"T": T, "ratio": r, "window_end": e, "remaining": n, "rule": rule,
                                     "warm_start": warm, "tail_steps": k, "rms_error": round(err, 6)})
                        print(rows[-1], flush=True)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main()
