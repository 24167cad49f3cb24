"""OP-GRPO replay buffer: selection, eviction, expiry, truncation, checkpoint round trip."""
import torch

from flowpo.buffer import ReplayBuffer, admit
from flowpo.plans import truncation_keep
from flowpo.schedule import sigmas
from flowpo.trajectory import Trajectory


def _fill(buf, it, prompts, rewards, T=6):
    n = len(prompts)
    states = torch.randn(n, T + 1, 1, 2, 2)
    train = torch.ones(n, T, dtype=torch.bool)
    train[:, -1] = False
    lp = torch.randn(n, T)
    r = torch.tensor(rewards)
    rows = Trajectory(prompts=prompts, metadata=[{}] * n, versions=torch.full((n,), it), states=states,
                      log_probs=lp, train=train, final=states[:, -1], raw=r[:, None])
    buf.add(rows, r)
    return states, lp


def test_keeps_best_per_prompt_and_evicts():
    buf = ReplayBuffer(sigmas(6), capacity_per_prompt=2, max_age=5)
    _fill(buf, 0, ["a", "a", "a", "b"], [0.125, 0.875, 0.5, 0.25])
    assert len(buf) == 3
    assert [e.reward for e in buf.best("a", 0, 2)] == [0.875, 0.5]
    _fill(buf, 1, ["a"], [0.75])
    assert [e.reward for e in buf.best("a", 1, 5)] == [0.875, 0.75]  # 0.5 evicted


def test_expiry_and_decay():
    buf = ReplayBuffer(sigmas(6), capacity_per_prompt=3, max_age=2, decay=0.1)
    _fill(buf, 0, ["a"], [1.0])
    _fill(buf, 2, ["a"], [0.875])
    # at iteration 3: scores 1.0 − 0.3 = 0.7 versus 0.875 − 0.1 = 0.775 → newer first
    assert [e.reward for e in buf.best("a", 3, 2)] == [0.875, 1.0]
    assert buf.expire(3) == 1 and [e.version for e in buf.best("a", 3, 5)] == [2]
    assert buf.expire(10) == 1 and len(buf) == 0


def test_truncation_stores_exactly_the_kept_steps():
    s = sigmas(6)
    buf = ReplayBuffer(s, capacity_per_prompt=1, truncation=truncation_keep(s, 0.7))
    states, lp = _fill(buf, 0, ["a"], [1.0])
    e = buf.best("a", 0, 1)[0]
    expect = [t for t in range(5) if float(s[t]) >= 0.7]  # trained steps 0..4 with σ_t ≥ 0.7: 0..3
    assert e.steps.tolist() == expect and len(expect) < 5
    assert torch.equal(e.x, states[0, expect]) and torch.equal(e.x_next, states[0, [t + 1 for t in expect]])
    assert torch.equal(e.log_prob, lp[0, expect])
    # of the states only x_0..x_4 (what steps 0-3 touch) are kept: 5 of 7, not 2 per kept step
    assert e.state_index.tolist() == [0, 1, 2, 3, 4] and e.row.states.shape[1] == 5
    assert torch.equal(e.full_row(6).states[0, :5], states[0, :5]) and not e.full_row(6).states[0, 5:].any()


def test_state_dict_round_trip():
    buf = ReplayBuffer(sigmas(6), capacity_per_prompt=2)
    _fill(buf, 0, ["a", "b", "b"], [0.1, 0.2, 0.3])
    t, m = buf.state_dict()
    buf2 = ReplayBuffer(sigmas(6), capacity_per_prompt=2)
    buf2.load_state_dict(t, m)
    for p in ("a", "b"):
        for e1, e2 in zip(buf.best(p, 0, 2), buf2.best(p, 0, 2)):
            assert e1.reward == e2.reward and torch.equal(e1.x, e2.x) and torch.equal(e1.steps, e2.steps)


def test_admission_rules():
    fresh = torch.tensor([0.2, 0.5])
    assert admit("always", 0.0, fresh)
    assert admit("beats_best", 0.6, fresh) and not admit("beats_best", 0.5, fresh)
    assert not admit("no_spread", 0.9, fresh) and admit("no_spread", 0.0, torch.tensor([1.0, 1.0]))
    assert admit("beats_best_or_no_spread", 0.0, torch.tensor([1.0, 1.0]))
