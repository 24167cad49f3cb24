"""Step plans: mask contracts, hand-computed window schedules, truncation, resume."""
import pytest
import torch

from flowpo.plans import (
    AllButLast,
    PlanOutput,
    RandomSubset,
    RandomWindow,
    SlidingWindow,
    Truncate,
    build_plan,
    truncation_keep,
)
from flowpo.schedule import sigmas as make_sigmas

G10 = make_sigmas(10, 3.0)  # [1, .964, .923, .875, .818, .75, .667, .5625, .4286, .25, 0]
G25 = make_sigmas(25, 3.0)


def _groups(b=3, g=4):
    return torch.arange(b).repeat_interleave(g)  # [N] = [0,0,0,0,1,1,1,1,2,2,2,2]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _all_plans():
    return [
        AllButLast(G10),
        RandomSubset(G10, 0.6),
        RandomSubset(G10, 0.6, share_in_group=True),
        RandomWindow(G10),
        SlidingWindow(G25, 4, "progressive"),
        SlidingWindow(G25, 4, "random"),
        SlidingWindow(G25, 4, "frozen"),
        SlidingWindow(G25, 4, "progressive_decay"),
        Truncate(AllButLast(G10), sigma_min=0.5),
        Truncate(SlidingWindow(G25, 4, "random"), fraction=0.3),
    ]


@pytest.mark.parametrize("plan", _all_plans(), ids=lambda p: type(p).__name__)
def test_mask_contract(plan):
    gen, groups = _gen(), _groups()
    for it in range(0, 200, 7):
        out = plan(it, 12, groups, gen)
        assert isinstance(out, PlanOutput)
        assert out.sde.shape == out.train.shape == (12, plan.T)
        assert out.sde.dtype == out.train.dtype == torch.bool
        assert not (out.train & ~out.sde).any()  # train ⊆ sde
        assert not out.train[:, -1].any()  # the step into σ' = 0 is never trained
        if not isinstance(plan, Truncate):  # truncation may legitimately empty a late window
            assert out.train.any(dim=1).all()  # every sample trains something


def test_plan_output_rejects_bad_masks():
    ok = torch.zeros(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="subset"):
        PlanOutput(ok, ok | True, None)
    last = ok.clone()
    last[:, -1] = True
    with pytest.raises(ValueError, match="last step"):
        PlanOutput(last, last, None)


def test_all_but_last_trains_first_t_minus_one():
    out = AllButLast(G10, 0.99)(0, 12, _groups(), _gen())  # ⌊0.99·10⌋ = 9
    assert out.sde.all()
    assert torch.equal(out.train[0], torch.tensor([True] * 9 + [False]))
    assert out.window is None
    assert AllButLast(G10, 0.5).n_train == 5
    assert AllButLast(G10, 1.0).n_train == 9  # capped at T − 1


def test_random_subset_counts_and_variety():
    plan = RandomSubset(G10, 0.6)  # k = round(0.6·9) = round(5.4) = 5 of the 9 usable steps
    out = plan(0, 12, _groups(), _gen())
    assert out.sde.all()
    assert (out.train.sum(1) == 5).all()
    assert len({tuple(r.tolist()) for r in out.train}) > 1  # differs across samples
    assert RandomSubset(G25, 0.5).k == 12  # round(0.5·24)
    assert RandomSubset(G10, 0.5).k == 5  # round-half-up(4.5)


def test_random_subset_shared_within_groups():
    out = RandomSubset(G10, 0.6, share_in_group=True)(0, 12, _groups(), _gen())
    rows = out.train.view(3, 4, 10)
    assert (rows == rows[:, :1]).all()  # same subset inside a group
    assert len({tuple(r.tolist()) for r in rows[:, 0]}) > 1  # different across groups
    # group ids need not be contiguous or sorted
    ids = torch.tensor([7, 2, 7, 2])
    out = RandomSubset(G10, 0.6, share_in_group=True)(0, 4, ids, _gen())
    assert torch.equal(out.train[0], out.train[2]) and torch.equal(out.train[1], out.train[3])


def test_random_subset_is_reproducible_from_generator():
    a = RandomSubset(G10, 0.6)(0, 12, _groups(), _gen(3)).train
    b = RandomSubset(G10, 0.6)(0, 12, _groups(), _gen(3)).train
    assert torch.equal(a, b)


def test_random_window_in_first_half():
    plan = RandomWindow(G10, 2, 3)  # range [0, 5)
    seen_sizes = set()
    gen = _gen()
    for it in range(100):
        out = plan(it, 12, _groups(), gen)
        lo, hi = out.window
        seen_sizes.add(hi - lo)
        assert 0 <= lo and hi <= 5 and 2 <= hi - lo <= 3
        expected = torch.zeros(10, dtype=torch.bool)
        expected[lo:hi] = True
        assert torch.equal(out.sde, expected.expand(12, 10)) and torch.equal(out.train, out.sde)
    assert seen_sizes == {2, 3}


def _starts(plan, iterations, gen=None):
    gen = gen or _gen()
    return [plan(i, 4, _groups(1, 4), gen).window[0] for i in iterations]


def test_sliding_window_progressive_mixgrpo_defaults():
    # T = 25, w = 4, τ = 25, s = 1: l = min(⌊i/25⌋, l_max) with l_max = 25 − 1 − 4 = 20
    plan = SlidingWindow(G25, 4, "progressive", stride=1, interval=25)
    assert _starts(plan, [0, 24, 25, 49, 50, 499, 500, 525, 10_000]) == [0, 0, 1, 1, 2, 19, 20, 20, 20]
    out = plan(60, 4, _groups(1, 4), _gen())
    assert out.window == (2, 6)
    assert out.train[0].nonzero().flatten().tolist() == [2, 3, 4, 5]


def test_sliding_window_progressive_stride_and_clamp():
    # T = 10, w = 3, τ = 3, s = 2: l_max = 6; l = 0,0,0,2,2,2,4,4,4,6,6,6,6(clamped from 8)
    plan = SlidingWindow(G10, 3, "progressive", stride=2, interval=3)
    assert _starts(plan, range(13)) == [0, 0, 0, 2, 2, 2, 4, 4, 4, 6, 6, 6, 6]
    last = plan(100, 4, _groups(1, 4), _gen())
    assert last.window == (6, 9) and not last.train[:, 9].any()


def test_sliding_window_progressive_decay():
    # τ_l = max(1, ⌊4·0.5^l⌋) = 4, 2, 1, 1, …: l = 0 for i ∈ [0, 4), 1 for [4, 6), 2 at 6, 3 at 7, …
    plan = SlidingWindow(G10, 2, "progressive_decay", stride=1, interval=4, decay=0.5, min_interval=1)
    assert _starts(plan, range(14)) == [0, 0, 0, 0, 1, 1, 2, 3, 4, 5, 6, 7, 7, 7]


def test_sliding_window_frozen_and_random():
    assert set(_starts(SlidingWindow(G25, 4, "frozen"), range(50))) == {0}
    starts = _starts(SlidingWindow(G25, 4, "random"), range(300))
    assert min(starts) == 0 and max(starts) == 20 and len(set(starts)) == 21


def test_truncation_by_sigma():
    # σ_t ≥ 0.5 holds for t ≤ 7 (σ_7 = 0.5625, σ_8 = 0.4286): steps 8 and 9 are dropped
    keep = truncation_keep(G10, sigma_min=0.5)
    assert keep.tolist() == [True] * 8 + [False] * 2
    out = Truncate(AllButLast(G10), sigma_min=0.5)(0, 12, _groups(), _gen())
    assert out.sde.all()  # truncation changes what is trained, not what is sampled
    assert out.train[0].tolist() == [True] * 8 + [False] * 2


def test_truncation_by_fraction():
    assert truncation_keep(G10, fraction=0.3).tolist() == [True] * 7 + [False] * 3
    assert truncation_keep(G10, fraction=0.0).all()
    out = Truncate(RandomSubset(G10, 1.0), fraction=0.3)(0, 12, _groups(), _gen())
    assert (out.train.sum(1) == 7).all()


def test_window_composed_with_truncation():
    # progressive window (w = 4, τ = 1) on T = 10; drop σ_t < 0.6 → steps 7, 8, 9
    plan = Truncate(SlidingWindow(G10, 4, "progressive", interval=1), sigma_min=0.6)
    out = plan(2, 4, _groups(1, 4), _gen())  # window [2, 6): fully kept
    assert out.window == (2, 6) and out.train[0].nonzero().flatten().tolist() == [2, 3, 4, 5]
    out = plan(5, 4, _groups(1, 4), _gen())  # window [5, 9) (l_max = 5): 7, 8 cut
    assert out.window == (5, 9)
    assert out.sde[0].nonzero().flatten().tolist() == [5, 6, 7, 8]
    assert out.train[0].nonzero().flatten().tolist() == [5, 6]


@pytest.mark.parametrize("make", [
    lambda: SlidingWindow(G25, 4, "progressive", interval=3),
    lambda: SlidingWindow(G25, 4, "random"),
    lambda: Truncate(SlidingWindow(G25, 4, "progressive_decay", interval=5), fraction=0.2),
    lambda: RandomSubset(G10, 0.6),
])
def test_state_dict_round_trip_continues_the_same_sequence(make):
    gen = _gen(5)
    plan = make()
    for i in range(10):
        plan(i, 12, _groups(), gen)
    state, gen_state = plan.state_dict(), gen.get_state()
    reference = [plan(i, 12, _groups(), gen) for i in range(10, 30)]

    resumed, gen2 = make(), torch.Generator()
    resumed.load_state_dict(state)
    gen2.set_state(gen_state)
    assert resumed.state_dict() == state
    for i, ref in zip(range(10, 30), reference):
        out = resumed(i, 12, _groups(), gen2)
        assert torch.equal(out.train, ref.train) and torch.equal(out.sde, ref.sde) and out.window == ref.window
    assert resumed.state_dict()["iteration"] == 29


def test_build_plan_and_validation():
    assert isinstance(build_plan("all_but_last", G10), AllButLast)
    p = build_plan("sliding_window", G25, window_size=4, strategy="frozen", truncate_sigma_min=0.2)
    assert isinstance(p, Truncate) and isinstance(p.inner, SlidingWindow)
    with pytest.raises(ValueError, match="kind='flow'.*all_but_last"):
        build_plan("flow", G10)
    with pytest.raises(ValueError, match="strategy='sliding'"):
        build_plan("sliding_window", G25, strategy="sliding")
    with pytest.raises(ValueError, match="window_size=25"):
        build_plan("sliding_window", G25, window_size=25)
    with pytest.raises(ValueError, match="subset_fraction=1.5"):
        build_plan("random_subset", G10, subset_fraction=1.5)
    with pytest.raises(ValueError, match="exactly one"):
        build_plan("all_but_last", G10, truncate_sigma_min=0.2, truncate_fraction=0.1)
    with pytest.raises(ValueError, match="window_range"):
        build_plan("random_window", G10, window_range=(0, 2), window_max=3)
    with pytest.raises(ValueError, match="sigmas"):
        AllButLast(torch.tensor([0.0, 1.0]))
