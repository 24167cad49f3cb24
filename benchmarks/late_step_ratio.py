"""OP-GRPO's late-step argument, measured: Var[log π_new(x'|x) − log π_old(x'|x)] versus σ.

    PYTHONPATH=src python benchmarks/late_step_ratio.py [--draws 20000] [--out docs/img/late_step_ratio.png]

Gaussian data x0 ~ N(m, c²I) (m = 0.3, c = 0.5, D = 4) has the exact velocity
v*(x, σ) = ((σ − (1−σ)c²)/V)·(x − (1−σ)m) − m with V = (1−σ)²c² + σ² (derived in
tests/test_sde.py). The old policy uses v_old = v* + δ·u (u = 1, δ = 0.01), the new one
v_new = v*. For each SDE kernel and step σ → σ' we draw x from the data marginal at σ, x' from
the old kernel, and report the variance over draws of the sum-reduced per-step log-ratio.
For a Gaussian step with means Δμ apart and std s the log-ratio is Δμ·z/s − |Δμ|²/(2s²), so its
variance is |Δμ|²/s²; Δμ = O(|dt|·δ) for the Flow-GRPO/DanceGRPO/DDIM kernels while s² shrinks
with σ, which is why late (small-σ) steps give ill-conditioned ratios (arXiv 2604.04142).

Two sweeps: (A) a fixed step |dt| = 0.01 at several σ, isolating the effect of σ; (B) the
trainable steps of the Flow-GRPO training grid (T = 10, shift 3).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from flowpo.schedule import sigmas as make_sigmas
from flowpo.sde import KERNELS

M, C, D, DELTA, DT = 0.3, 0.5, 4, 0.01, 0.01
NOISE = {"flow_grpo": 0.7, "dance_grpo": 0.3, "cps": 0.8, "ddim": 1.0}
SIGMAS_A = [0.9, 0.7, 0.5, 0.3, 0.2, 0.1, 0.05, 0.03, 0.02]


def exact_velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
    var = (1 - sigma) ** 2 * C**2 + sigma**2
    return (sigma - (1 - sigma) * C**2) / var * (x - (1 - sigma) * M) - M


def log_ratio_var(kernel: str, sigma: float, sigma_next: float, draws: int, gen: torch.Generator) -> float:
    fn, a = KERNELS[kernel], NOISE[kernel]
    x0 = M + C * torch.randn(draws, D, generator=gen)
    x = (1 - sigma) * x0 + sigma * torch.randn(draws, D, generator=gen)  # [draws, D]
    v_new = exact_velocity(x, sigma)
    v_old = v_new + DELTA
    old = fn(x, v_old, sigma, sigma_next, a, noise=torch.randn(draws, D, generator=gen), reduction="sum")
    new = fn(x, v_new, sigma, sigma_next, a, sample=old.sample, reduction="sum")
    return float((new.log_prob - old.log_prob).var())


def sweep(pairs: list[tuple[float, float]], draws: int, seed: int) -> dict[str, list[float]]:
    gen = torch.Generator().manual_seed(seed)
    return {k: [log_ratio_var(k, s, sn, draws, gen) for s, sn in pairs] for k in NOISE}


def markdown(title: str, pairs, table) -> str:
    head = "| σ → σ' | " + " | ".join(f"{k} ({'a' if k in ('flow_grpo', 'cps') else 'η'}={NOISE[k]})" for k in NOISE) + " |"
    lines = [f"**{title}**", "", head, "|---|" + "---|" * len(NOISE)]
    for i, (s, sn) in enumerate(pairs):
        lines.append(f"| {s:.4f} → {sn:.4f} | " + " | ".join(f"{table[k][i]:.3g}" for k in NOISE) + " |")
    return "\n".join(lines)


def plot(path: Path, pairs_a, table_a, pairs_b, table_b) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, pairs, table, title in ((axes[0], pairs_a, table_a, f"(A) fixed |dt| = {DT}"),
                                    (axes[1], pairs_b, table_b, "(B) training grid T=10, shift 3")):
        for k in NOISE:
            ax.plot([s for s, _ in pairs], table[k], marker="o", label=k)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("σ (step start)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("Var[log π_new − log π_old] (sum over D)")
    axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("docs/img/late_step_ratio.png"))
    args = parser.parse_args()

    pairs_a = [(s, s - DT) for s in SIGMAS_A]
    grid = make_sigmas(10, 3.0).tolist()
    pairs_b = [(grid[t], grid[t + 1]) for t in range(9)]  # the last step (σ' = 0) is never trained
    table_a = sweep(pairs_a, args.draws, args.seed)
    table_b = sweep(pairs_b, args.draws, args.seed + 1)
    print(markdown(f"(A) fixed |dt| = {DT}", pairs_a, table_a))
    print()
    print(markdown("(B) Flow-GRPO training grid, T = 10, shift 3, trainable steps", pairs_b, table_b))
    plot(args.out, pairs_a, table_a, pairs_b, table_b)
    print(f"\nsaved {args.out}")


if __name__ == "__main__":
    main()
