"""Step plans: per iteration and per sample, which of the T steps are SDE and which are trained.

Step t is the transition σ_t → σ_{t+1} of the grid `sigmas` [T + 1] (σ_0 = 1, σ_T = 0).
Every plan is called as

    plan(iteration, n, group_ids, generator) -> PlanOutput(sde [N, T], train [N, T], window)

with train ⊆ sde, and no plan ever trains the last step T − 1 into σ' = 0 (its Gaussian is a
delta; REFERENCE.md). Randomness comes only from `generator`; window positions are pure
functions of the iteration index, so a resumed run only needs the iteration (and the generator
state, which the trainer saves) to continue the same schedule. `state_dict()` records the last
call (iteration, window) for logging and checkpoints; `load_state_dict()` restores it.

| plan | SDE | trained | source |
|---|---|---|---|
| AllButLast | all | first ⌊f·T⌋ steps, at most T − 1 | Flow-GRPO (2505.05470) |
| RandomSubset | all | per sample round(f·(T−1)) random usable steps | DanceGRPO (2505.07818) |
| RandomWindow | window | window of random size in [w_min, w_max] in a range | Flow-GRPO fast configs |
| RandomSteps | the k drawn steps | k distinct random steps of a range, one draw per iteration | DGPO (2510.08425), Flow-DPPO (2606.11025) |
| SlidingWindow | window | w consecutive steps at l (frozen/random/progressive/decay) | MixGRPO (2507.21802) |
| Stratified | all | one step from each of k strata of [first, ⌊f·T⌋), shared by all rows | AWM (2509.25050) code |
| Truncate | inner's | inner's minus the late steps (σ_t < σ_min, or last fraction) | OP-GRPO (2604.04142) |
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, NoReturn

import torch
from torch import Tensor

__all__ = [
    "PlanOutput",
    "Plan",
    "AllButLast",
    "RandomSubset",
    "RandomWindow",
    "RandomSteps",
    "SlidingWindow",
    "Stratified",
    "Truncate",
    "truncation_keep",
    "build_plan",
    "PLAN_KINDS",
    "WINDOW_STRATEGIES",
]

PlanKind = str  # a key of PLANS
WindowStrategy = Literal["frozen", "random", "progressive", "progressive_decay"]
WINDOW_STRATEGIES = ("frozen", "random", "progressive", "progressive_decay")


def _fail(field: str, value: Any, allowed: str) -> NoReturn:
    raise ValueError(f"plan {field}={value!r} is invalid; allowed: {allowed}")


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


@dataclass(frozen=True)
class PlanOutput:
    """What one iteration samples and trains."""

    sde: Tensor  # [N, T] bool: step t is stochastic (SDE kernel), else ODE
    train: Tensor  # [N, T] bool: step t enters the ratio and the loss; train ⊆ sde
    window: tuple[int, int] | None  # [start, end) shared by all samples for window plans, else None

    def __post_init__(self) -> None:
        if self.sde.dtype != torch.bool or self.train.dtype != torch.bool:
            raise ValueError("PlanOutput masks must be bool tensors")
        if self.sde.shape != self.train.shape or self.sde.dim() != 2:
            raise ValueError(f"PlanOutput masks must both be [N, T]; got {tuple(self.sde.shape)}, {tuple(self.train.shape)}")
        if bool((self.train & ~self.sde).any()):
            raise ValueError("PlanOutput.train must be a subset of PlanOutput.sde")
        if bool(self.train[:, -1].any()):
            raise ValueError("PlanOutput.train must never include the last step into σ' = 0")


class Plan:
    """Base: holds the σ grid and the last-call record. Subclasses implement `_masks`."""

    def __init__(self, sigmas: Tensor) -> None:
        sigmas = torch.as_tensor(sigmas, dtype=torch.float32).flatten().cpu()
        if sigmas.numel() < 2:
            _fail("sigmas", tuple(sigmas.tolist()), "a decreasing grid [T + 1] with T >= 1")
        if not bool((sigmas[1:] < sigmas[:-1]).all()) or float(sigmas[-1]) != 0.0:
            _fail("sigmas", tuple(sigmas.tolist()), "a strictly decreasing grid ending at 0")
        self.sigmas = sigmas  # [T + 1]
        self.T = sigmas.numel() - 1
        self._last: dict[str, Any] = {"iteration": -1, "window": None}

    # subclasses: return (sde [n, T], train [n, T], window) on the CPU
    def _masks(self, iteration: int, n: int, group_ids: Tensor, generator: torch.Generator):
        raise NotImplementedError

    def __call__(self, iteration: int, n: int, group_ids: Tensor, generator: torch.Generator) -> PlanOutput:
        if group_ids.shape != (n,):
            raise ValueError(f"group_ids has shape {tuple(group_ids.shape)}; expected ({n},)")
        sde, train, window = self._masks(iteration, n, group_ids.cpu(), generator)
        self._last = {"iteration": int(iteration), "window": None if window is None else list(window)}
        dev = group_ids.device
        return PlanOutput(sde.to(dev), train.to(dev), window)

    def _full(self, n: int, steps: Tensor) -> Tensor:
        """A [T] bool row repeated for n samples. → [n, T]"""
        return steps.unsqueeze(0).expand(n, self.T).clone()

    def _window_row(self, start: int, end: int) -> Tensor:
        row = torch.zeros(self.T, dtype=torch.bool)  # [T]
        row[start:end] = True
        return row

    def state_dict(self) -> dict[str, Any]:
        return {"iteration": self._last["iteration"], "window": self._last["window"]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._last = {"iteration": int(state["iteration"]), "window": state["window"]}


class AllButLast(Plan):
    """Flow-GRPO: every step SDE; train the first ⌊f·T⌋ steps, never the last (f = 0.99, T = 10 → 9)."""

    def __init__(self, sigmas: Tensor, train_fraction: float = 0.99) -> None:
        super().__init__(sigmas)
        if not 0 < train_fraction <= 1:
            _fail("train_fraction", train_fraction, "a float in (0, 1]")
        if self.T < 2:
            _fail("sigmas", self.T, "T >= 2 (the last step is never trained)")
        self.n_train = max(1, min(self.T - 1, math.floor(train_fraction * self.T + 1e-9)))

    def _masks(self, iteration, n, group_ids, generator):
        sde = torch.ones(n, self.T, dtype=torch.bool)
        train = self._full(n, self._window_row(0, self.n_train))
        return sde, train, None


class RandomSubset(Plan):
    """DanceGRPO: every step SDE; each sample trains k = round(f·(T − 1)) random usable steps.

    Usable steps are 0 … T − 2. With `share_in_group`, members of one group (same group id) train
    the same subset; otherwise every sample draws its own. round is half-up.
    """

    def __init__(self, sigmas: Tensor, fraction: float = 0.6, share_in_group: bool = False) -> None:
        super().__init__(sigmas)
        if not 0 < fraction <= 1:
            _fail("subset_fraction", fraction, "a float in (0, 1]")
        if self.T < 2:
            _fail("sigmas", self.T, "T >= 2 (the last step is never trained)")
        self.usable = self.T - 1
        self.k = max(1, _round_half_up(fraction * self.usable))
        self.share_in_group = share_in_group

    def _masks(self, iteration, n, group_ids, generator):
        if self.share_in_group:
            groups, row_of = torch.unique(group_ids, return_inverse=True)  # row_of: [n]
            rows = len(groups)
        else:
            row_of, rows = torch.arange(n), n
        scores = torch.rand(rows, self.usable, generator=generator, device=generator.device).cpu()
        picked = scores.argsort(dim=1)[:, : self.k]  # [rows, k]
        usable = torch.zeros(rows, self.T, dtype=torch.bool)
        usable.scatter_(1, picked, True)
        return torch.ones(n, self.T, dtype=torch.bool), usable[row_of], None


def _randint(low: int, high: int, generator: torch.Generator) -> int:
    """Uniform integer in [low, high] (inclusive) from `generator`."""
    if generator is None:
        raise ValueError("this plan draws random steps; pass a torch.Generator")
    return int(torch.randint(low, high + 1, (1,), generator=generator, device=generator.device).item())


class RandomWindow(Plan):
    """Flow-GRPO fast: a window of size w ~ U{w_min … w_max} at start l ~ U{lo … hi − w}.

    Steps in [l, l + w) are SDE and trained, the rest ODE; one window per iteration for all
    samples. The range [lo, hi) defaults to the first half, [0, T // 2), and is clipped to T − 1.
    """

    def __init__(self, sigmas: Tensor, min_size: int = 2, max_size: int = 3, window_range: tuple[int, int] | None = None) -> None:
        super().__init__(sigmas)
        lo, hi = window_range if window_range is not None else (0, self.T // 2)
        hi = min(hi, self.T - 1)
        if not 1 <= min_size <= max_size:
            _fail("window_min/window_max", (min_size, max_size), "1 <= window_min <= window_max")
        if not (0 <= lo and hi - lo >= max_size):
            _fail("window_range", window_range, f"[lo, hi) with 0 <= lo, hi <= T - 1 = {self.T - 1}, hi - lo >= window_max = {max_size}")
        self.min_size, self.max_size, self.lo, self.hi = min_size, max_size, lo, hi

    def _masks(self, iteration, n, group_ids, generator):
        size = _randint(self.min_size, self.max_size, generator)
        start = _randint(self.lo, self.hi - size, generator)
        row = self._window_row(start, start + size)
        return self._full(n, row), self._full(n, row), (start, start + size)


class RandomSteps(Plan):
    """k distinct steps drawn uniformly (without replacement) from [lo, hi), one draw per iteration
    shared by every row; they are SDE and trained, every other step is ODE.

    DGPO (arXiv 2510.08425; its code trains 4 random indices of the first 5 grid steps, the same
    for the whole batch) and Flow-DPPO (arXiv 2606.11025; UniRL's recipe: 3 random SDE steps of the
    first half). The range defaults to the first half, [0, T // 2), clipped to T − 1."""

    def __init__(self, sigmas: Tensor, count: int = 3, window_range: tuple[int, int] | None = None) -> None:
        super().__init__(sigmas)
        lo, hi = window_range if window_range is not None else (0, self.T // 2)
        hi = min(hi, self.T - 1)
        if not (0 <= lo and 1 <= count <= hi - lo):
            _fail("num_steps/window_range", (count, window_range),
                  f"1 <= num_steps <= hi - lo with [lo, hi) inside [0, T - 1 = {self.T - 1})")
        self.count, self.lo, self.hi = count, lo, hi

    def _masks(self, iteration, n, group_ids, generator):
        if generator is None:
            raise ValueError("this plan draws random steps; pass a torch.Generator")
        scores = torch.rand(self.hi - self.lo, generator=generator, device=generator.device).cpu()
        row = torch.zeros(self.T, dtype=torch.bool)
        row[self.lo + scores.argsort()[: self.count]] = True
        return self._full(n, row), self._full(n, row), None


class SlidingWindow(Plan):
    """MixGRPO: w consecutive steps [l, l + w) are SDE and trained, ODE outside (arXiv 2507.21802).

    l ∈ [0, l_max] with l_max = T − 1 − w, so the window never reaches the last step (MixGRPO
    clamps at T − w; the project keeps the delta step T − 1 out of training). Strategies:
    - frozen: l ≡ 0.
    - random: l ~ U{0 … l_max} every iteration (from `generator`).
    - progressive: l = min(s·⌊i/τ⌋, l_max) (MixGRPO's default; T = 25, w = 4, τ = 25, s = 1).
    - progressive_decay: the window dwells τ_l = max(τ_min, ⌊τ·γ^l⌋) iterations at position l,
      then moves by s, so τ shrinks as l grows (the paper's exact decay rule is not public).
    """

    def __init__(self, sigmas: Tensor, size: int = 4, strategy: WindowStrategy = "progressive", stride: int = 1,
                 interval: int = 25, decay: float = 0.9, min_interval: int = 1) -> None:
        super().__init__(sigmas)
        if strategy not in WINDOW_STRATEGIES:
            _fail("strategy", strategy, str(WINDOW_STRATEGIES))
        if not 1 <= size <= self.T - 1:
            _fail("window_size", size, f"an int in [1, T - 1 = {self.T - 1}]")
        if stride < 1:
            _fail("stride", stride, "an int >= 1")
        if interval < 1:
            _fail("interval", interval, "an int >= 1")
        if not 0 < decay <= 1:
            _fail("decay", decay, "a float in (0, 1]")
        if min_interval < 1:
            _fail("min_interval", min_interval, "an int >= 1")
        self.size, self.strategy, self.stride = size, strategy, stride
        self.interval, self.decay, self.min_interval = interval, decay, min_interval
        self.l_max = self.T - 1 - size

    def dwell(self, start: int) -> int:
        """τ_l for progressive_decay."""
        return max(self.min_interval, math.floor(self.interval * self.decay**start + 1e-9))

    def window_start(self, iteration: int, generator: torch.Generator | None = None) -> int:
        """l for this iteration (random needs the generator)."""
        if iteration < 0:
            _fail("iteration", iteration, "an int >= 0")
        if self.strategy == "frozen":
            return 0
        if self.strategy == "random":
            return _randint(0, self.l_max, generator)
        if self.strategy == "progressive":
            return min(self.stride * (iteration // self.interval), self.l_max)
        start, begins = 0, 0  # progressive_decay: walk the dwell times
        while start < self.l_max and begins + self.dwell(start) <= iteration:
            begins += self.dwell(start)
            start = min(start + self.stride, self.l_max)
        return start

    def _masks(self, iteration, n, group_ids, generator):
        start = self.window_start(iteration, generator)
        row = self._window_row(start, start + self.size)
        return self._full(n, row), self._full(n, row), (start, start + self.size)


class Stratified(Plan):
    """AWM's timestep plan (scxue/advantage_weighted_matching, `time_type` discrete_wo_init, and
    discrete with first = 0): every step SDE; k steps trained, one per stratum.

    The strata split [first, hi) with hi = min(⌊f·T⌋, T − 1) at the points b_j = first +
    j·(hi − first)/k (j = 0 … k); stratum j holds the integers ⌊b_j⌋ … ⌊b_{j+1}⌋ − 1 and its step is
    ⌊b_j⌋ + ⌊u_j·(⌊b_{j+1}⌋ − ⌊b_j⌋)⌋ with u_j ~ U[0, 1), one draw per iteration shared by every
    row (the authors share it across a micro-batch). AWM's SD3.5-M configs: T = 14, f = 0.9, k = 6,
    first = 1, so the steps come from 1–11 and σ = 1 (step 0, whose input holds nothing of x0) is
    never trained. k is capped at hi − first (then every step first … hi − 1 trains), so a preset's
    k stays valid on a short grid.
    """

    def __init__(self, sigmas: Tensor, count: int = 6, first: int = 1, fraction: float = 0.9) -> None:
        super().__init__(sigmas)
        if not 0 < fraction <= 1:
            _fail("train_fraction", fraction, "a float in (0, 1]")
        self.hi = min(math.floor(fraction * self.T + 1e-9), self.T - 1)
        if not 0 <= first < self.hi:
            _fail("strata_first", first, f"an int in [0, {self.hi - 1}] (the strata end at step {self.hi})")
        if count < 1:
            _fail("strata", count, "an int >= 1")
        self.count = min(count, self.hi - first)  # a short grid: every usable step, one per stratum
        b = torch.linspace(first, self.hi, self.count + 1).floor().long()  # [k + 1]
        self.lower, self.width = b[:-1], b[1:] - b[:-1]  # [k], [k]

    def _masks(self, iteration, n, group_ids, generator):
        u = torch.rand(len(self.lower), generator=generator, device=generator.device).cpu()
        picked = self.lower + (u * self.width).long()  # [k]
        row = torch.zeros(self.T, dtype=torch.bool)
        row[picked] = True
        return torch.ones(n, self.T, dtype=torch.bool), self._full(n, row), None


def truncation_keep(sigmas: Tensor, sigma_min: float | None = None, fraction: float | None = None) -> Tensor:
    """OP-GRPO late-step truncation: which steps keep training. → bool [T]

    Drops step t when σ_t < sigma_min (σ_t is the step's starting noise level), or the last
    round(fraction·T) steps (half-up). Exactly one of the two must be given.
    """
    if (sigma_min is None) == (fraction is None):
        _fail("truncate_sigma_min/truncate_fraction", (sigma_min, fraction), "exactly one of the two")
    T = sigmas.numel() - 1
    if sigma_min is not None:
        if not 0 <= sigma_min <= 1:
            _fail("truncate_sigma_min", sigma_min, "a float in [0, 1]")
        return sigmas[:-1] >= sigma_min
    if not 0 <= fraction < 1:
        _fail("truncate_fraction", fraction, "a float in [0, 1)")
    keep = torch.ones(T, dtype=torch.bool)
    cut = _round_half_up(fraction * T)
    if cut > 0:
        keep[T - cut:] = False
    return keep


class Truncate(Plan):
    """Wrap any plan and remove late steps from `train` (OP-GRPO, arXiv 2604.04142); `sde` is kept."""

    def __init__(self, inner: Plan, sigma_min: float | None = None, fraction: float | None = None) -> None:
        super().__init__(inner.sigmas)
        self.inner = inner
        self.keep = truncation_keep(inner.sigmas, sigma_min, fraction)  # [T]

    def _masks(self, iteration, n, group_ids, generator):
        out = self.inner(iteration, n, group_ids, generator)
        return out.sde.cpu(), out.train.cpu() & self.keep, out.window

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "inner": self.inner.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.inner.load_state_dict(state["inner"])


def build_plan(
    kind: PlanKind,
    sigmas: Tensor,
    *,
    train_fraction: float = 0.99,
    subset_fraction: float = 0.6,
    share_in_group: bool = False,
    window_min: int = 2,
    window_max: int = 3,
    window_range: tuple[int, int] | None = None,
    window_size: int = 4,
    num_steps: int = 3,
    strategy: WindowStrategy = "progressive",
    stride: int = 1,
    interval: int = 25,
    decay: float = 0.9,
    min_interval: int = 1,
    truncate_sigma_min: float | None = None,
    truncate_fraction: float | None = None,
    strata: int = 6,
    strata_first: int = 1,
) -> Plan:
    """Build a plan from plain keyword arguments (config fields), wrapped in `Truncate` when a
    truncation field is set. Only the fields of the chosen kind are used.

    - all_but_last: train_fraction
    - random_subset: subset_fraction, share_in_group
    - random_window: window_min, window_max, window_range
    - random_steps: num_steps, window_range
    - sliding_window: window_size, strategy, stride, interval (τ), decay (γ), min_interval (τ_min)
    - stratified: strata (k), strata_first, train_fraction (f)
    """
    if kind not in PLANS:
        _fail("kind", kind, str(list(PLANS)))
    plan: Plan = PLANS[kind](sigmas, dict(
        train_fraction=train_fraction, subset_fraction=subset_fraction, share_in_group=share_in_group,
        window_min=window_min, window_max=window_max, window_range=window_range, window_size=window_size,
        num_steps=num_steps, strategy=strategy, stride=stride, interval=interval, decay=decay,
        min_interval=min_interval, strata=strata, strata_first=strata_first))
    if truncate_sigma_min is not None or truncate_fraction is not None:
        plan = Truncate(plan, truncate_sigma_min, truncate_fraction)
    return plan


PLANS: dict[str, Any] = {
    "all_but_last": lambda sig, a: AllButLast(sig, a["train_fraction"]),
    "random_subset": lambda sig, a: RandomSubset(sig, a["subset_fraction"], a["share_in_group"]),
    "random_window": lambda sig, a: RandomWindow(sig, a["window_min"], a["window_max"], a["window_range"]),
    "random_steps": lambda sig, a: RandomSteps(sig, a["num_steps"], a["window_range"]),
    "sliding_window": lambda sig, a: SlidingWindow(sig, a["window_size"], a["strategy"], a["stride"], a["interval"],
                                                   a["decay"], a["min_interval"]),
    "stratified": lambda sig, a: Stratified(sig, a["strata"], a["strata_first"], a["train_fraction"]),
}
"""plan.kind → builder from (σ grid, the plan's keyword fields); the only list of the plan names."""
PLAN_KINDS = tuple(PLANS)
