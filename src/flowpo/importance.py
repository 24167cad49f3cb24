"""OP-GRPO's importance weights of replayed rows (arXiv 2604.04142, §3.2): the formulas, and the
rule a run uses (`WeightRule`, resolved once from replay.is_* at build).

A replayed row was sampled by an older behaviour policy β; its transitions enter the clipped
surrogate with a detached weight w that corrects for the shift to π_old (the iteration's starting
weights), while PPO's clip stays on π_θ/π_old. Replay appends the rows with their behaviour
log-probs and the rule; the objective computes π_old and applies the rule (objectives/clipped.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


STEP_LOCAL = ("none", "per_step")
"""The replay.is_correction forms whose weight at (row i, step t) needs π_old at (i, t) only."""


def step_weights(pi_old: torch.Tensor, beta: torch.Tensor, kept: torch.Tensor, *, correction: str,
                 cap: float | None = None, scale: float = 1.0,
                 clip: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights of the per-step forms (`STEP_LOCAL`: none, per_step) → (w, bounded), both shaped
    like pi_old: w_t = π_old(t)/β(t) (1 for none) after `scale`, `clip` and `cap` as in
    `importance_weights`, and where the clip or the cap changed it. Element by element, so any
    subset of the pairs (one step of one chunk, as the update's first forward gives π_old: replay.py)
    gets the same values as the whole table."""
    d = (pi_old - beta) * kept * scale
    return _bounded(torch.ones_like(d) if correction == "none" else d.exp(), cap, clip)


def _bounded(w: torch.Tensor, cap: float | None, clip: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """w clipped to [1/clip, clip], then truncated at cap → (w, where either changed it)."""
    capped = torch.zeros_like(w, dtype=torch.bool)
    if clip is not None:
        capped = (w > clip) | (w < 1 / clip)
        w = w.clamp(1 / clip, clip)
    if cap is not None:
        capped |= w > cap
        w = w.clamp(max=cap)
    return w, capped


def importance_weights(pi_old: torch.Tensor, beta: torch.Tensor, kept: torch.Tensor, *,
                       correction: str = "sequence", form: str = "geomean",
                       cap: float | None = None, scale: float = 1.0,
                       clip: float | None = None) -> tuple[torch.Tensor, dict]:
    """OP-GRPO importance weights of replayed rows → ([R, T] detached weights, stats).

    pi_old, beta [R, T]: log-probs of the stored transitions under π_old (the iteration's starting
    weights: replay.py says where they come from) and under the behaviour policy β that generated
    them; kept [R, T] bool.
        sequence, product:  w = Π_{t∈K} π_old/β = exp(Σ_K (log π_old − log β))
        sequence, geomean:  w = exp(mean_K (log π_old − log β))
        per_step:           w_t = π_old(t)/β(t)
        none:               w = 1
    Every form is truncated at `cap`. The PPO clip stays on π_θ/π_old; w multiplies the step losses.
    `scale` multiplies the per-step log-ratios first (D, the latent size, turns mean-reduced
    log-probs into the full density: replay.is_density=sum), and `clip` then bounds w to
    [1/clip, clip]. Stats: mean, max and 10/50/90th percentiles of the sequence weight, the std of
    its log, the capped fraction of kept steps, and Kish's effective sample size (Σw)²/Σw².
    """
    if correction not in ("none", "sequence", "per_step"):
        raise ValueError(f"replay.is_correction={correction!r}; allowed: none, sequence, per_step")
    if form not in ("product", "geomean"):
        raise ValueError(f"replay.is_form={form!r}; allowed: product, geomean")
    cnt = kept.sum(1).clamp_min(1)
    if correction in STEP_LOCAL:
        w, capped = step_weights(pi_old, beta, kept, correction=correction, cap=cap, scale=scale, clip=clip)
    else:
        d = (pi_old - beta) * kept * scale                      # [R, T]
        logw = d.sum(1) if form == "product" else d.sum(1) / cnt
        w, capped = _bounded(logw.exp()[:, None].expand_as(d).clone(), cap, clip)
    seq = w[:, 0] if correction != "per_step" else (w * kept).sum(1) / cnt
    ess = float(seq.sum() ** 2 / (seq ** 2).sum().clamp_min(1e-12))
    q = torch.quantile(seq.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.double)).tolist()
    return w.detach(), {"replay/w_mean": float(seq.mean()), "replay/w_max": float(seq.max()),
                        "replay/w_p10": q[0], "replay/w_p50": q[1], "replay/w_p90": q[2],
                        "replay/logw_std": float(seq.log().std(unbiased=False)),
                        "replay/capped_frac": float((capped & kept).sum() / kept.sum().clamp_min(1)),
                        "replay/ess": ess}


@dataclass(frozen=True)
class WeightRule:
    """How replayed rows are weighted: `importance_weights`' options as one value (replay.is_*)."""

    correction: str = "sequence"     # none | sequence | per_step
    form: str = "geomean"            # product | geomean (sequence forms)
    cap: float | None = 2.0
    scale: float = 1.0
    clip: float | None = None

    def __post_init__(self):
        if self.correction not in ("none", "sequence", "per_step"):
            raise ValueError(f"replay.is_correction={self.correction!r}; allowed: none, sequence, per_step")
        if self.form not in ("product", "geomean"):
            raise ValueError(f"replay.is_form={self.form!r}; allowed: product, geomean")

    @property
    def step_local(self) -> bool:
        """Whether the weight at (row i, step t) needs π_old at (i, t) only (so any subset of the
        pairs, one step of one chunk, gets the values of the whole table)."""
        return self.correction in STEP_LOCAL

    def step(self, pi_old: torch.Tensor, beta: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """The per-step forms' weights, element by element (`step_weights`)."""
        return step_weights(pi_old, beta, kept, correction=self.correction, cap=self.cap, scale=self.scale,
                            clip=self.clip)[0]

    def weights(self, pi_old: torch.Tensor, beta: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Rows' weights and stats (`importance_weights`)."""
        return importance_weights(pi_old, beta, kept, correction=self.correction, form=self.form, cap=self.cap,
                                  scale=self.scale, clip=self.clip)
