"""The objective part: exact answers of the DiffusionNFT and AWM losses, the direction of one update
for every objective, the KL term and its reference pass, and the registry as the only list."""
import math

import pytest
import torch

from flowpo import config
from flowpo.trajectory import Chunks, Trajectory
from flowpo.config import ConfigError
from flowpo.objectives import OBJECTIVES, Context, build_objective
from flowpo.objectives.awm import awm_log_likelihood
from flowpo.objectives.nft import nft_loss, optimality
from flowpo.policy.embedded import EmbeddedPolicy
from flowpo.rollout import row_noise
from flowpo.schedule import sigmas as make_sigmas
from flowpo.sde import KERNELS
from flowpo.training.trainer import Trainer


# ----------------------------------------------------------------------------- exact answers
def test_optimality_maps_advantages_to_probabilities():
    a = torch.tensor([-10.0, -5.0, 0.0, 2.5, 5.0, 7.0])
    assert optimality(a, 5.0).tolist() == [0.0, 0.0, 0.5, 0.75, 1.0, 1.0]


def test_nft_loss_by_hand():
    # one sample, one dim: x = 0.5, x0 = 0.2, σ = 0.5, v = 1.0, v_old = 0.6, β = 0.5, r = 0.75
    v, v_old = torch.tensor([[1.0]]), torch.tensor([[0.6]])
    x, x0, r = torch.tensor([[0.5]]), torch.tensor([[0.2]]), torch.tensor([0.75])
    loss, lp, ln = nft_loss(v, v_old, x, x0, 0.5, r, beta=0.5, adv_max=5.0)
    v_pos, v_neg = 0.5 * 0.6 + 0.5 * 1.0, 1.5 * 0.6 - 0.5 * 1.0          # 0.8, 0.4
    e_pos, e_neg = (0.5 - 0.5 * v_pos) - 0.2, (0.5 - 0.5 * v_neg) - 0.2  # -0.1, 0.1
    want_pos, want_neg = e_pos ** 2 / abs(e_pos), e_neg ** 2 / abs(e_neg)
    assert lp.item() == pytest.approx(want_pos) and ln.item() == pytest.approx(want_neg)
    assert loss.item() == pytest.approx(5.0 / 0.5 * (0.75 * want_pos + 0.25 * want_neg))


def test_nft_gradient_moves_the_positive_policy_toward_the_data():
    # r = 1: only v⁺ is trained; the gradient in v must point to reduce |x̂0⁺ − x0|
    torch.manual_seed(0)
    x0, eps = torch.randn(4, 3), torch.randn(4, 3)
    sig = 0.6
    x = (1 - sig) * x0 + sig * eps
    v_old = (eps - x0) + 0.3 * torch.randn(4, 3)
    v = v_old.clone().requires_grad_(True)
    loss, _, _ = nft_loss(v, v_old, x, x0, sig, torch.ones(4), beta=1.0, adv_max=5.0)
    loss.sum().backward()
    v_new = v.detach() - 1e-3 * v.grad
    err = lambda vv: ((x - sig * vv) - x0).abs().sum()  # noqa: E731
    assert err(v_new) < err(v_old)


def test_awm_log_likelihood_forms():
    v, u = torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 1.0]])  # m = (1 + 4) / 2 = 2.5
    assert awm_log_likelihood(v, u, 0.4, "uniform", 0.25).item() == pytest.approx(-2.5)
    assert awm_log_likelihood(v, u, 0.4, "t", 0.25).item() == pytest.approx(-1.0)
    want = -((2.5 + 1e-10) ** 0.25 - 1e-10 ** 0.25) * 0.4 / 0.25
    assert awm_log_likelihood(v, u, 0.4, "ghuber", 0.25).item() == pytest.approx(want)


# ----------------------------------------------------------------------------- one update, in isolation
def _setup(kind: str, *overrides: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = config.load(None, None, [f"objective.kind={kind}", *overrides])
    policy = EmbeddedPolicy(mode="lora", lora_rank=4, lora_alpha=8.0)
    params = policy.trainable_parameters()
    with torch.no_grad():  # a non-zero adapter, so the policy differs from the reference
        for p in params:
            p.add_(0.02 * torch.randn_like(p))
    sig = make_sigmas(4, 3.0)
    ctx = Context(policy=policy, sigmas=sig, kernel=KERNELS["flow_grpo"], guidance=1.0, noise_level=0.7,
                  reduction="mean", seed=0, params=params)
    return cfg, policy, params, sig, build_objective(kind, ctx, cfg)


def _batch(policy, sig, adv_value: float, n: int = 4, trained=(1,)):
    T = sig.numel() - 1
    dims = policy.latent_shape
    cond = policy.encode_prompts(["a handwritten 3"] * n)
    states = torch.zeros(n, T + 1, *dims)
    x = row_noise(list(range(n)), dims)
    states[:, 0] = x
    with torch.no_grad():  # an SDE trajectory (the clipped surrogate scores its transitions)
        for t in range(T):
            v = policy.velocity(x, torch.full((n,), float(sig[t])), cond, 1.0)
            x = KERNELS["flow_grpo"](x, v, float(sig[t]), float(sig[t + 1]), 0.7,
                                     noise=row_noise([100 + 10 * i + t for i in range(n)], dims)).sample
            states[:, t + 1] = x
    train = torch.zeros(n, T, dtype=torch.bool)
    train[:, list(trained)] = True
    old = torch.zeros(n, T)
    for t in trained:
        with torch.no_grad():
            v = policy.velocity(states[:, t], torch.full((n,), float(sig[t])), cond, 1.0)
            old[:, t] = KERNELS["flow_grpo"](states[:, t], v, float(sig[t]), float(sig[t + 1]), 0.7,
                                             sample=states[:, t + 1]).log_prob
    return Trajectory(states=states, final=x, train=train, log_probs=old, old_log_probs=old,
                      old_known=torch.ones(n, T, dtype=torch.bool), adv=torch.full((n, T), adv_value),
                      weights=torch.ones(n, T), cond=cond, chunks=Chunks([torch.arange(n)], [0], 1),
                      row_ids=torch.arange(n))


def _step(obj, params, b, lr=1e-2):
    opt = torch.optim.SGD(params, lr=lr)
    obj.begin(b, 0)
    opt.zero_grad()
    obj.chunk_loss(b, b.chunks.rows[0], float(b.train.sum()))
    opt.step()
    obj.end(0)


def _log_prob(policy, sig, b, t=1):
    with torch.no_grad():
        v = policy.velocity(b.states[:, t], torch.full((b.states.shape[0],), float(sig[t])), b.cond, 1.0)
        return KERNELS["flow_grpo"](b.states[:, t], v, float(sig[t]), float(sig[t + 1]), 0.7,
                                    sample=b.states[:, t + 1]).log_prob


def _matching_error(policy, sig, b, noise, t=1):
    s = float(sig[t])
    x0 = b.final
    x = (1 - s) * x0 + s * noise[:, t]
    with torch.no_grad():
        v = policy.velocity(x, torch.full((x.shape[0],), s), b.cond, 1.0)
    return ((v - (noise[:, t] - x0)) ** 2).flatten(1).mean(1)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_clipped_surrogate_direction(sign):
    _, policy, params, sig, obj = _setup("clipped_surrogate", "loss.clip_range=10")
    b = _batch(policy, sig, sign)
    before = _log_prob(policy, sig, b)
    _step(obj, params, b)
    change = (_log_prob(policy, sig, b) - before).mean()
    assert change * sign > 0, float(change)


@pytest.mark.parametrize("kind", ["diffusion_nft", "awm"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_final_sample_objectives_direction(kind, sign):
    # a positive advantage lowers the flow-matching error on that sample, a negative one raises it
    _, policy, params, sig, obj = _setup(kind, "objective.ref_beta=0", "objective.nft_beta=1.0")
    b = _batch(policy, sig, 5.0 * sign)
    obj.begin(b, 0)
    noise = obj.noise.clone()
    before = _matching_error(policy, sig, b, noise)
    _step(obj, params, b, lr=1e-2)
    change = (_matching_error(policy, sig, b, noise) - before).mean()
    assert change * sign < 0, float(change)


def test_awm_first_gradient_is_the_advantage_weighted_likelihood_gradient():
    # ρ = 1 on the first pass, so ∇L = −A'·∇ℓ_θ (+ the reference term, off here)
    _, policy, params, sig, obj = _setup("awm", "objective.ref_beta=0", "objective.awm_weighting=uniform")
    b = _batch(policy, sig, 2.0)
    obj.begin(b, 0)
    for p in params:
        p.grad = None
    obj.chunk_loss(b, b.chunks.rows[0], float(b.train.sum()))
    got = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    s = float(sig[1])
    x0, eps = b.final, obj.noise[:, 1]
    v = policy.velocity((1 - s) * x0 + s * eps, torch.full((4,), s), b.cond, 1.0)
    ll = -((v - (eps - x0)) ** 2).flatten(1).mean(1)
    (-(2.0 / 5.0) * ll).sum().div(4.0).backward()
    for g, p in zip(got, params):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------------------- KL and its reference pass
def test_kl_term_is_zero_at_the_reference_and_matches_the_formula_away_from_it():
    from flowpo.loss import mean_kl

    _, policy, params, sig, obj = _setup("clipped_surrogate", "loss.kl_beta=0.5", "loss.kl_form=exact")
    b = _batch(policy, sig, 0.0)  # A = 0: the loss is the KL term alone
    obj.begin(b, 0)
    stats = obj.chunk_loss(b, b.chunks.rows[0], 1.0)
    t = 1
    st = obj.rescore(b.states, b.chunks.rows[0], t, b.cond)
    with torch.no_grad(), policy.disable_adapter():
        ref = obj.rescore(b.states, b.chunks.rows[0], t, b.cond)
    want = mean_kl(st.mean, ref.mean, st.std, float(sig[t + 1] - sig[t]), "exact").sum().detach()
    assert want > 0
    assert stats[0].kl_sum == pytest.approx(float(want), rel=1e-5)
    # at the reference (adapter zeroed) the KL and its gradient vanish
    with torch.no_grad():
        for p in params:
            p.zero_()
    for p in params:
        p.grad = None
    stats = obj.chunk_loss(b, b.chunks.rows[0], 1.0)
    assert stats[0].kl_sum == 0.0
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in params)


# ----------------------------------------------------------------------------- registry and config
def test_the_registry_is_the_config_s_list_of_objectives():
    assert config.choices("objective.kind") == list(OBJECTIVES)
    with pytest.raises(ConfigError, match="objective.kind='nft'.*diffusion_nft"):
        config.load(None, None, ["objective.kind=nft"])


@pytest.mark.parametrize("preset", ["diffusion_nft", "awm", "flowpo_nft"])
def test_successor_presets_train_and_resume_bit_exactly(tmp_path, tiny, preset):
    # flowpo_nft: its replay buffer and cosine schedule resume too (the horizon fixed, as a resumed
    # run that raises train.iterations keeps it)
    extra = ["objective.old_ramp=0.3", "train.lr_horizon=3"]
    full = Trainer(config.load(None, preset, tiny + ["train.iterations=3", *extra]), tmp_path / "a")
    full.run()
    part = Trainer(config.load(None, preset, tiny + ["train.iterations=2", *extra]), tmp_path / "b")
    part.run()
    cfg = config.load(str(tmp_path / "b" / "config.yaml"), None, ["train.iterations=3"], keep_resolved=True)
    resumed = Trainer(cfg, tmp_path / "b", resume=True)
    resumed.run()
    for k, v in full.policy.trainable_state_dict().items():
        assert torch.equal(v, resumed.policy.trainable_state_dict()[k]), k
    old_full = full.parts.objective.state_dict()
    assert old_full and all(torch.equal(v, resumed.parts.objective.state_dict()[k]) for k, v in old_full.items())


def test_nft_samples_with_the_old_policy(tmp_path, tiny):
    # θ_old lags θ after an iteration with η > 0; the rollout's sampling context swaps it in and back
    tr = Trainer(config.load(None, "diffusion_nft", tiny + ["objective.old_ramp=0.5", "objective.old_max=0.5"]),
                 tmp_path / "r")
    tr.train_iteration(0)
    tr.iteration = 1
    tr.train_iteration(1)  # η_1 = 0.5: θ_old = ½θ_old + ½θ ≠ θ
    obj = tr.parts.objective
    now = [p.detach().clone() for p in tr.params]
    assert any(not torch.equal(s, p) for s, p in zip(obj.old.shadow, now))
    with obj.sampling():
        inside = [p.detach().clone() for p in tr.params]
    assert all(torch.equal(a, s) for a, s in zip(inside, obj.old.shadow))
    assert all(torch.equal(a, p) for a, p in zip(now, tr.params))
    assert math.isfinite(tr.train_iteration(2)["loss/policy"])


@pytest.mark.parametrize("preset,extra", [
    ("diffusion_nft", ["advantage.kind=stepwise", "sample.shared_noise=true", "advantage.substeps=2"]),
    ("diffusion_nft", ["plan.kind=sliding_window", "plan.strategy=frozen", "plan.window_size=2", "solver.kind=dpm2m",
                       "solver.compression=0.5"]),
    ("awm", ["replay.k=1", "replay.tail=regenerate", "replay.rule=always", "replay.truncate=sigma", "replay.truncate_at=0.5"]),
    ("awm", ["sample.kernel=flow_grpo"]),  # an SDE rollout under a final-sample objective
])
def test_successors_combine_with_any_rollout_part(tmp_path, tiny, preset, extra):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a handwritten 7\n")
    tr = Trainer(config.load(None, preset, tiny + [f"sample.prompts_file={prompts}", *extra]), tmp_path / "r")
    before = [p.detach().clone() for p in tr.params]
    recs = [tr.train_iteration(0)]
    tr.iteration = 1
    recs.append(tr.train_iteration(1))
    assert all(math.isfinite(r["loss/policy"]) for r in recs)
    assert any(not torch.equal(a, p) for a, p in zip(before, tr.params))
    if "replay.k=1" in extra:
        assert recs[1]["replay/admitted"] > 0
