"""Old predictions taken from the update's first forward (BENCHMARKS §11a): OP-GRPO's π_old of the
replayed rows and AWM's ℓ_old come from the update's own forward on the chunks of minibatch 0,
which runs before any optimizer step, instead of a pass of their own. The weights and the logged
stats equal those of the old path (a pass for every chunk, kept here as the forced fallback), and
the model calls drop by exactly that pass; chunks that train after an optimizer step still get it."""
import collections
from typing import NamedTuple

import pytest
import torch

from flowpo import config
from flowpo.training.trainer import Trainer

REPLAY = ["replay.rule=always", "replay.tail=drop"]
# 2 groups × (4 − 1) fresh = 6 rows in chunks of 4: fresh global chunks 0, 1 and the replayed rows'
# chunk 2, which train.minibatches=2 puts in minibatch 0 (2 mod 2) and 3 in minibatch 2 (2 mod 3)
IN_FIRST, AFTER_A_STEP = ["train.minibatches=2"], ["train.minibatches=3"]
W_STATS = ("replay/w_mean", "replay/w_max", "replay/w_p10", "replay/w_p50", "replay/w_p90", "replay/logw_std",
           "replay/capped_frac", "replay/ess")
LOSS_STATS = ("loss/policy", "loss/kl", "loss/anchor", "stats/ratio_mean", "stats/ratio_max", "stats/clipfrac",
              "stats/approx_kl", "stats/neg_log_likelihood", "stats/transitions", "stats/grad_norm")


class Run(NamedTuple):
    weights: dict            # trainable tensors after the iterations
    recs: list               # the iterations' records
    calls: dict              # policy.velocity calls by purpose (begin, replay_pi_old, update, rollout, …)
    rows: dict               # and their rows
    sigmas: torch.Tensor


def _train(tmp_path, tiny, preset: str, extra: list[str], lazy: bool, iterations: int = 2) -> Run:
    """`iterations` iterations of `preset` on a one-prompt pool (from iteration 1 on, every group
    replays when replay is on). lazy=False forces the old path: every chunk's old prediction gets a
    pass of its own (no `first` chunks for the objective, which owns π_old and ℓ_old)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten 7\n")
    name = f"{preset}_{'lazy' if lazy else 'upfront'}_{len(list(tmp_path.iterdir()))}"
    tr = Trainer(config.load(None, preset, tiny + [f"sample.prompts_file={prompts}", *extra]), tmp_path / name)
    P = tr.parts
    if not lazy:
        begin = P.objective.begin
        P.objective.begin = lambda b, it, first=(): begin(b, it)
    stack, calls, rows = ["other"], collections.Counter(), collections.Counter()
    velocity = tr.policy.velocity

    def counted(x, *a, **k):
        calls[stack[-1]] += 1
        rows[stack[-1]] += int(x.shape[0])
        return velocity(x, *a, **k)

    def during(fn, purpose):
        def run(*a, **k):
            stack.append(purpose)
            try:
                return fn(*a, **k)
            finally:
                stack.pop()
        return run

    tr.policy.velocity = counted
    # the clipped surrogate's begin makes the replayed rows' π_old passes and nothing else
    clipped = type(P.objective).__name__ == "ClippedSurrogate"
    P.objective.begin = during(P.objective.begin, "replay_pi_old" if clipped else "begin")
    tr._update = during(tr._update, "update")
    recs = []
    for it in range(iterations):
        tr.iteration = it
        recs.append(tr.train_iteration(it))
    weights = {k: v.detach().clone() for k, v in tr.policy.trainable_state_dict().items()}
    return Run(weights, recs, dict(calls), dict(rows), tr.sigmas)


def _assert_same(a: Run, b: Run, keys) -> None:
    assert set(a.weights) == set(b.weights) and all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)
    for x, y in zip(a.recs, b.recs):
        for k in keys:
            assert x.get(k) == y.get(k), (k, x.get(k), y.get(k))


def _without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


@pytest.mark.parametrize("extra", [["replay.is_correction=none"],
                                   ["replay.is_correction=per_step", "replay.is_density=sum"]])
def test_replayed_pi_old_from_the_first_forward_saves_exactly_its_pass(tmp_path, tiny, extra):
    args = REPLAY + IN_FIRST + extra
    lazy = _train(tmp_path, tiny, "op_grpo", args, lazy=True)
    upfront = _train(tmp_path, tiny, "op_grpo", args, lazy=False)
    _assert_same(lazy, upfront, W_STATS + LOSS_STATS)
    assert lazy.recs[1]["replay/admitted"] == 2 and "replay/w_mean" in lazy.recs[1]
    # the old path's π_old pass: one call on the replayed chunk (2 rows) at each of its kept steps;
    # it is gone, and no other call changed
    kept = int((upfront.sigmas[:3] >= 0.5).sum())
    assert upfront.calls["replay_pi_old"] == kept and upfront.rows["replay_pi_old"] == 2 * kept
    assert "replay_pi_old" not in lazy.calls
    assert lazy.calls == _without(upfront.calls, "replay_pi_old")
    assert lazy.rows == _without(upfront.rows, "replay_pi_old")


def test_replayed_pi_old_keeps_its_pass_when_the_chunk_trains_after_an_optimizer_step(tmp_path, tiny):
    args = REPLAY + ["replay.is_correction=per_step"] + AFTER_A_STEP        # minibatch 2 of 3
    lazy = _train(tmp_path, tiny, "op_grpo", args, lazy=True)
    upfront = _train(tmp_path, tiny, "op_grpo", args, lazy=False)
    _assert_same(lazy, upfront, W_STATS + LOSS_STATS)
    assert lazy.recs[1]["replay/admitted"] == 2 and "replay/w_mean" in lazy.recs[1]
    assert lazy.calls == upfront.calls and lazy.calls["replay_pi_old"] > 0


@pytest.mark.parametrize("extra", [["replay.is_correction=sequence"], ["loss.forward_rows=trained"]])
def test_replayed_pi_old_keeps_its_pass_where_the_first_forward_cannot_give_it(tmp_path, tiny, extra):
    # a sequence weight needs all of a row's steps before the row's first step trains;
    # forward_rows=trained runs other rows per forward than the pass (not bit-identical)
    run = _train(tmp_path, tiny, "op_grpo", REPLAY + IN_FIRST + ["replay.is_correction=per_step"] + extra, lazy=True)
    assert run.recs[1]["replay/admitted"] == 2 and "replay/w_mean" in run.recs[1]
    assert run.calls["replay_pi_old"] == int((run.sigmas[:3] >= 0.5).sum())


@pytest.mark.parametrize("minibatches", [1, 2])
def test_awm_ll_old_from_the_first_forward_saves_exactly_its_pass(tmp_path, tiny, minibatches):
    # objective.begin makes ℓ_old and the EMA anchor's calls, one each per chunk and trained step,
    # so half of them are ℓ_old's. One minibatch: all of ℓ_old comes from the update's forward; two
    # (8 rows in chunks of 4): chunk 0's, chunk 1 (after the first optimizer step) keeps its pass.
    # The anchor (other weights) and the update's calls are unchanged.
    args = [f"train.minibatches={minibatches}", "objective.old_ramp=0.3"]
    lazy = _train(tmp_path, tiny, "awm", args, lazy=True)
    upfront = _train(tmp_path, tiny, "awm", args, lazy=False)
    _assert_same(lazy, upfront, LOSS_STATS)
    assert _without(lazy.calls, "begin") == _without(upfront.calls, "begin")
    assert _without(lazy.rows, "begin") == _without(upfront.rows, "begin")
    ll_calls, ll_rows = upfront.calls["begin"] // 2, upfront.rows["begin"] // 2
    saved_calls, saved_rows = upfront.calls["begin"] - lazy.calls["begin"], upfront.rows["begin"] - lazy.rows["begin"]
    if minibatches == 1:
        assert (saved_calls, saved_rows) == (ll_calls, ll_rows)
    else:
        assert 0 < saved_calls < ll_calls and 0 < saved_rows < ll_rows


@pytest.mark.parametrize("extra", [["train.minibatches=2", "train.inner_epochs=2"],
                                   ["replay.k=1", "replay.rule=always", "replay.tail=regenerate",
                                    "train.minibatches=2"]])
def test_awm_ll_old_from_the_first_forward_equals_its_pass(tmp_path, tiny, extra):
    # a second pass over the chunks (chunk 0's ℓ_old kept from the first), a minibatch after a
    # step; replayed rows (their chunk 2 in minibatch 0). Two minibatches (the awm preset takes
    # one since issue 29), so a later minibatch trains after a step.
    args = ["objective.old_ramp=0.3", *extra]
    lazy = _train(tmp_path, tiny, "awm", args, lazy=True)
    upfront = _train(tmp_path, tiny, "awm", args, lazy=False)
    _assert_same(lazy, upfront, LOSS_STATS)
    assert lazy.calls["begin"] < upfront.calls["begin"]
    assert lazy.recs[1]["stats/ratio_max"] != 1.0  # later steps did move away from ℓ_old


@pytest.mark.parametrize("form", ["geomean", "product"])
def test_hold_graphs_gives_sequence_weights_without_their_pass(tmp_path, tiny, form):
    # replay.hold_graphs: the replayed chunk keeps its step graphs until its rows' sequence weights
    # are known from its own forwards, then backwards once. π_old and the weights are the pass's
    # bit for bit (same rows, same weights, before any step), so the weight stats are equal; the
    # gradient is one backward of the summed step losses instead of one per step, equal up to
    # float summation order
    args = REPLAY + IN_FIRST + ["replay.is_correction=sequence", f"replay.is_form={form}",
                                "replay.is_density=sum"]  # (sum: weights visibly away from 1)
    held = _train(tmp_path, tiny, "op_grpo", args + ["replay.hold_graphs=true"], lazy=True)
    upfront = _train(tmp_path, tiny, "op_grpo", args, lazy=True)
    assert held.recs[1]["replay/admitted"] == 2
    assert upfront.recs[1]["replay/w_mean"] != 1.0
    for k in W_STATS:
        assert held.recs[1][k] == upfront.recs[1][k], k
    for k in upfront.weights:
        torch.testing.assert_close(held.weights[k], upfront.weights[k], rtol=0, atol=1e-6)
    assert "replay_pi_old" not in held.calls and upfront.calls["replay_pi_old"] == int((upfront.sigmas[:3] >= 0.5).sum())
    assert held.calls == _without(upfront.calls, "replay_pi_old")
    # and the weights are used: the held run differs from one that ignores them
    ones = _train(tmp_path, tiny, "op_grpo", REPLAY + IN_FIRST + ["replay.is_correction=none"], lazy=True)
    assert max(float((held.weights[k] - ones.weights[k]).abs().max()) for k in held.weights) > 1e-6


def test_hold_graphs_keeps_the_pass_after_an_optimizer_step(tmp_path, tiny):
    args = REPLAY + AFTER_A_STEP + ["replay.is_correction=sequence", "replay.hold_graphs=true"]
    run = _train(tmp_path, tiny, "op_grpo", args, lazy=True)
    ref = _train(tmp_path, tiny, "op_grpo", args[:-1], lazy=True)
    _assert_same(run, ref, W_STATS + LOSS_STATS)
    assert run.calls["replay_pi_old"] > 0
