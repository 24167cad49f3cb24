"""How the rollout and the update evaluate a guided velocity (`model.cfg_uncond`).

True classifier-free guidance (Ho & Salimans arXiv 2207.12598) needs two model outputs per row,
v = guide(v_u, v_c, g) (SD3, Wan: v_u + g·(v_c − v_u); Qwen-Image: the same renormalised to
‖v_c‖). Flow-GRPO's update back-propagates through the conditional branch only (model.cfg_grad =
conditional), so v_u carries no gradient, and at the iteration's starting weights θ_old it is, row
for row, the output the rollout already computed at the same state x_t. The modes:

- `joint`: one forward of 2n rows [v_u; v_c] (the pipelines' batching). In the update the
  backward runs through all 2n rows (the detached half's gradients are zeros).
- `recompute`: two forwards of n rows, v_u under no_grad (with cfg_grad=conditional), so the
  update's backward covers the n conditional rows only. Values equal joint's up to the
  batch-size dependence of the kernels (measured: ≤ 2e-6 on the embedded model).
- `reuse` (the default): recompute, but the rollout keeps v_u at the states the update will
  re-score (objectives with `rescores_rollout`: the clipped surrogate; the others train on
  noised final samples the rollout never evaluated, so their rollout runs joint) (`Trajectory.uncond`, one latent per row and stochastic step, fp32), and the update
  takes them instead of running the unconditional forward wherever the weights are still the
  rollout's: the rollout's own chunks (fresh rows) before the iteration's first optimizer step.
  The update chunks are the rollout chunks (loss.forward_rows=chunk), so the stored tensor is
  bit-for-bit what recompute would compute there, and the trained weights equal recompute's
  exactly (tests/test_guided.py). After an optimizer step, and for replayed rows, v_u is
  recomputed. With cfg_grad=both (gradient through v_u) nothing is reused.

A policy takes part in the split modes when it has `negative(cond) -> Cond` (the conditioning
of the unconditional rows of these rows: the negative prompt, with an editing model's sources) and `guide(v_u, v_c, guidance) -> v`, and its `velocity(x, σ, c, 1.0)` is one
branch's raw output; others (FLUX's guidance embedding: one branch) always run `velocity` as it is.
"""
from __future__ import annotations

import contextlib

import torch

MODES = ("joint", "recompute", "reuse")


def can_split(policy) -> bool:
    """Whether `policy` exposes its two CFG branches (see the module docstring)."""
    return callable(getattr(policy, "negative", None)) and callable(getattr(policy, "guide", None))


class GuidedVelocity:
    """v(x, σ | c) at the run's guidance, evaluated as `model.cfg_uncond` says.

    split: the two branches run as separate forwards (recompute, reuse; a policy with CFG at this
    guidance that exposes its branches). reuse: the rollout keeps v_u and the update may pass it."""

    def __init__(self, policy, guidance: float, mode: str = "joint", cfg_grad: str = "conditional"):
        if mode not in MODES:
            raise ValueError(f"model.cfg_uncond={mode!r}; allowed: {', '.join(MODES)}")
        self.policy, self.guidance = policy, guidance
        self.split = mode != "joint" and policy.evals_per_row(guidance) == 2 and can_split(policy)
        self.detach = cfg_grad == "conditional"
        self.reuse = self.split and mode == "reuse" and self.detach
        # the rollout splits its stochastic steps only for an objective that re-scores them (the
        # clipped surrogate): there its forwards match the update's bit for bit (ratio exactly 1)
        self.rollout = False

    def for_objective(self, objective) -> GuidedVelocity:
        """Settle what the rollout does for `objective` (its `rescores_rollout`): split and keep v_u
        at the stochastic steps, or run the policy's joint velocity everywhere (nothing to reuse)."""
        self.rollout = self.split and bool(getattr(objective, "rescores_rollout", False))
        self.reuse = self.reuse and self.rollout
        return self

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond, uncond: torch.Tensor | None = None, *,
                 keep: bool = False):
        """→ (v [n, *D], v_u [n, *D] or None). `uncond`: v_u known already (the rollout's, reuse).
        keep: return v_u (the rollout's split steps). Without a graph and without `keep` the two
        branches gain nothing from separate forwards, so they run joint (one 2N-row call: the
        reference's and π_old's passes)."""
        p, g = self.policy, self.guidance
        if not self.split or (uncond is None and not keep and not torch.is_grad_enabled()):
            return p.velocity(x, sigma, cond, g), None
        if uncond is None:
            with torch.no_grad() if self.detach else contextlib.nullcontext():
                uncond = p.velocity(x, sigma, p.negative(cond), 1.0)
        v_c = p.velocity(x, sigma, cond, 1.0)
        return p.guide(uncond, v_c, g), uncond
