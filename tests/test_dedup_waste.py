"""Work that repeated the same numbers, removed (issue 20, BENCHMARKS §11a): Stepwise's duplicate
estimates of bit-identical states, the reference outputs recomputed in every inner epoch, and the
weight copies of the θ_old / EMA swaps. Each removal is checked against the path it replaces."""
import contextlib

import pytest
import torch

from flowpo import config
from flowpo.parts import build_policy
from flowpo.schedule import sigmas as make_sigmas
from flowpo.stepwise import distinct_pairs, intermediate_rewards
from flowpo.ema import EMA
from flowpo.training.trainer import Trainer


# ----------------------------------------------------------------------------- stepwise state 0
def _counting(policy):
    """Wrap policy.velocity to count the rows it runs → the counter dict."""
    seen = {"rows": 0}
    inner = policy.velocity

    def velocity(x, *a, **k):
        seen["rows"] += x.shape[0]
        return inner(x, *a, **k)

    policy.velocity = velocity
    return seen


def _stepwise_inputs(policy, shared: bool, groups: int = 2, g: int = 4, T: int = 4):
    n = groups * g
    gen = torch.Generator().manual_seed(0)
    states = torch.randn(n, T + 1, *policy.latent_shape, generator=gen)
    if shared:  # sample.shared_noise: the rows of a group start from one x_init
        states[:, 0] = states[::g, 0].repeat_interleave(g, 0)
    prompts = [f"a handwritten {i // g}" for i in range(n)]
    train = torch.ones(n, T, dtype=torch.bool)
    train[:, -1] = False
    return states, train, prompts


def _run(policy, states, train, prompts, dedupe: bool, T: int = 4, substeps: int = 2):
    seen = _counting(policy)
    scored = []

    def score(images, texts):
        scored.append(len(texts))
        return images.flatten(1).mean(1) + torch.tensor([float(t[-1]) for t in texts])

    sr, _, nfe = intermediate_rewards(policy, states, train, make_sigmas(T), policy.encode_prompts(prompts), prompts,
                                      torch.zeros(len(prompts)), score, substeps=substeps, guidance=1.0,
                                      batch_size=5, dedupe=dedupe)
    return sr, seen["rows"], sum(scored), nfe


def test_shared_initial_noise_estimates_state_0_once_per_group_with_the_same_rewards():
    policy = build_policy(config.load().model)
    states, train, prompts = _stepwise_inputs(policy, shared=True)
    old, old_rows, old_scored, old_nfe = _run(policy, states, train, prompts, dedupe=False)
    new, new_rows, new_scored, new_nfe = _run(policy, states, train, prompts, dedupe=True)
    groups, g, substeps = 2, 4, 2
    assert old_scored == 8 * 4  # 8 rows × states x_0..x_3
    assert old_scored - new_scored == groups * (g - 1)                  # G − 1 fewer state-0 pairs per group
    assert old_rows - new_rows == groups * (g - 1) * substeps == old_nfe - new_nfe
    torch.testing.assert_close(new, old, rtol=0, atol=1e-6)              # bit-equal on this CPU (digests)
    for k in range(groups):                                              # one broadcast value per group
        assert new[k * g:(k + 1) * g, 0].unique().numel() == 1


def test_distinct_initial_noise_is_not_deduplicated():
    policy = build_policy(config.load().model)
    states, train, prompts = _stepwise_inputs(policy, shared=False)
    old, old_rows, old_scored, _ = _run(policy, states, train, prompts, dedupe=False)
    new, new_rows, new_scored, _ = _run(policy, states, train, prompts, dedupe=True)
    assert (new_rows, new_scored) == (old_rows, old_scored) and torch.equal(new, old)


def test_only_pairs_with_identical_inputs_are_merged():
    x = torch.randn(6, 3, 2)
    x[1], x[2], x[3], x[4], x[5] = x[0], x[0], x[0], x[0], x[0]
    x[3] = x[3].clone()
    x[3][0, 0] = -x[0][0, 0] if x[0][0, 0] != 0 else 1.0   # one value differs
    cond = {"emb": torch.zeros(6, 2)}
    cond["emb"][4] = 1.0                                   # other conditioning
    ts = torch.tensor([0, 0, 0, 0, 0, 1])                  # row 5: another step
    rows = torch.arange(6)
    prompts = ["a", "a", "b", "a", "a", "a"]               # row 2: another prompt
    keep, inverse = distinct_pairs(x, ts, rows, cond, prompts, None)
    assert keep.tolist() == [0, 2, 3, 4, 5] and inverse.tolist() == [0, 0, 1, 2, 3, 4]
    meta = [{"d": 1}, {"d": 2}, {"d": 1}, {"d": 1}, {"d": 1}, {"d": 1}]  # row 1: other metadata
    keep, _ = distinct_pairs(x, ts, rows, cond, prompts, meta)
    assert keep.tolist() == [0, 1, 2, 3, 4, 5]


def test_the_stepwise_preset_without_shared_noise_estimates_every_pair(tmp_path, tiny):
    over = tiny + ["advantage.substeps=2", "sample.shared_noise=false"]
    rec = Trainer(config.load(None, "stepwise_grpo", over), tmp_path / "s").train_iteration(0)
    assert rec["stepwise/nfe"] == 8 * 4 * 2  # rows × states x_0..x_3 × T′


# ----------------------------------------------------------------------------- reference across epochs
def _count_reference(policy):
    """Count the velocity calls made inside policy.disable_adapter() → the counter dict."""
    seen = {"calls": 0, "inside": False}
    inner_off, inner_v = policy.disable_adapter, policy.velocity

    @contextlib.contextmanager
    def disable_adapter():
        with inner_off():
            seen["inside"] = True
            try:
                yield
            finally:
                seen["inside"] = False

    def velocity(x, *a, **k):
        seen["calls"] += seen["inside"]
        return inner_v(x, *a, **k)

    policy.disable_adapter, policy.velocity = disable_adapter, velocity
    return seen


@pytest.mark.parametrize("preset,extra", [("flow_grpo", ["loss.kl_beta=0.04"]), ("diffusion_nft", []), ("awm", [])])
def test_the_reference_runs_once_per_chunk_and_step_per_iteration(tmp_path, tiny, preset, extra):
    def run(name, *more):
        tr = Trainer(config.load(None, preset, tiny + extra + list(more)), tmp_path / name)
        seen = _count_reference(tr.policy)
        calls = []
        for it in range(2):
            tr.iteration = it
            before = seen["calls"]
            tr.train_iteration(it)
            calls.append(seen["calls"] - before)
            assert len(tr.parts.objective.refs) == 0  # dropped at the end of the iteration
        return calls, tr.policy.trainable_state_dict()

    once, _ = run("e1", "train.inner_epochs=1")
    cached, w_cached = run("c", "train.inner_epochs=2")
    recomputed, w_recomputed = run("r", "train.inner_epochs=2", "train.cache_reference=false")
    assert cached[0] == once[0] > 0                       # (chunks × trained steps) reference calls
    assert recomputed == [2 * c for c in cached]          # the old path: once per epoch
    assert w_cached.keys() == w_recomputed.keys()
    for k in w_cached:
        assert torch.equal(w_cached[k], w_recomputed[k]), k


# ----------------------------------------------------------------------------- EMA / θ_old swaps
def test_swap_exchanges_storage_and_restores_it_exactly():
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    params = list(lin.parameters())
    ema = EMA(params, 0.5)
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    live = [p.detach().clone() for p in params]
    shadow = [s.clone() for s in ema.shadow]
    ptrs = [p.data_ptr() for p in params]
    with ema.swapped():
        assert all(torch.equal(p, s) for p, s in zip(params, shadow))
        assert all(torch.equal(s, a) for s, a in zip(ema.shadow, live))
        assert [s.data_ptr() for s in ema.shadow] == ptrs  # no copy: the live storage moved to the shadow
        assert lin.weight is params[0]                     # the module keeps its Parameter objects
    assert [p.data_ptr() for p in params] == ptrs
    assert all(torch.equal(p, a) for p, a in zip(params, live))
    assert all(torch.equal(s, b) for s, b in zip(ema.shadow, shadow))


def test_the_optimizer_updates_the_live_weights_after_a_swap_round_trip():
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    params = list(lin.parameters())
    opt = torch.optim.AdamW(params, lr=0.1)
    ema = EMA(params, 0.9)
    x = torch.randn(4, 3)

    def step():
        opt.zero_grad()
        lin(x).pow(2).sum().backward()
        opt.step()

    step()
    ema.update()
    with ema.swapped():
        lin(x)
    before = [p.detach().clone() for p in params]
    shadow = [s.clone() for s in ema.shadow]
    step()
    assert all(not torch.equal(p, b) for p, b in zip(params, before))         # the live weights moved
    assert all(torch.equal(s, b) for s, b in zip(ema.shadow, shadow))        # the shadow did not
    torch.manual_seed(0)                                                     # the same steps without a swap
    ref = torch.nn.Linear(3, 2)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=0.1)
    for _ in range(2):
        opt_ref.zero_grad()
        ref(x).pow(2).sum().backward()
        opt_ref.step()
    assert all(torch.equal(p, q) for p, q in zip(params, ref.parameters()))


def test_ema_resume_is_bit_exact(tmp_path, tiny):
    base = [x for x in tiny if not x.startswith("train.iterations")] + ["train.ema=0.5", "eval.every=1"]
    full = Trainer(config.load(None, None, base + ["train.iterations=3"]), tmp_path / "full")
    full.run()
    part = Trainer(config.load(None, None, base + ["train.iterations=1"]), tmp_path / "part")
    part.run()
    cfg = config.load(str(tmp_path / "part" / "config.yaml"), None, ["train.iterations=3"], keep_resolved=True)
    resumed = Trainer(cfg, tmp_path / "part", resume=True)
    resumed.run()
    assert all(torch.equal(a, b) for a, b in zip(full.ema.shadow, resumed.ema.shadow))
    a, b = full.policy.trainable_state_dict(), resumed.policy.trainable_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
