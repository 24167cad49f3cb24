"""Issue 30's methods: DGPO, GRPO-Guard, Flow-DPPO (objectives), the random_steps plan and the
Flow-GRPO-Fast presets.

Parity: each loss is recomputed here from the paper's equations by another route (float64, fixed
small tensors) and compared in value and gradient with flowpo's function (tolerance 1e-10 in
float64) and, through the objective on the embedded model, with a reference built from the policy
and the kernel directly (float32, 1e-5). Properties: zero advantage gives a zero gradient, the first
ratio is exactly 1, Flow-DPPO's divergence is the closed-form Gaussian KL. Combinations: each new
part trains with the rollout parts it makes sense with.
"""
import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from flowpo import config
from flowpo.config import ConfigError
from flowpo.objectives import Context, build_objective
from flowpo.objectives.dgpo import group_weights, matching_loss
from flowpo.objectives.dppo import dppo_loss
from flowpo.objectives.guard import guard_loss
from flowpo.objectives.step_means import mean_gap
from flowpo.plans import build_plan
from flowpo.policy.embedded import EmbeddedPolicy
from flowpo.presets import PRESETS
from flowpo.schedule import sigmas as make_sigmas
from flowpo.sde import KERNELS
from flowpo.training.trainer import Trainer
from test_objectives import _batch

D64 = dict(dtype=torch.float64)


def _gaussian(m=6, d=5, seed=0):
    """A step N(μ_old, s²I), a sample x' from it, the new mean μ_θ (a leaf) and advantages."""
    g = torch.Generator().manual_seed(seed)
    mu_old = torch.randn(m, d, generator=g, **D64)
    s = 0.05 + 0.2 * torch.rand(m, generator=g, **D64)
    z = torch.randn(m, d, generator=g, **D64)
    x = mu_old + s[:, None] * z
    mu = (mu_old + 0.02 * torch.randn(m, d, generator=g, **D64)).requires_grad_(True)
    adv = torch.tensor([1.5, -0.7, 2.0, -2.0, 0.3, -0.1], **D64)[:m]
    return mu_old, s, z, x, mu, adv


def _log_prob(x, mu, s):
    """mean_D log N(x; μ, s²) from torch.distributions (not flowpo.sde)."""
    return Normal(mu, s[:, None].expand_as(mu)).log_prob(x).mean(1)


def _grad(loss, leaf):
    (g,) = torch.autograd.grad(loss, leaf, retain_graph=True)
    return g


# ----------------------------------------------------------------------------- GRPO-Guard
def test_guard_matches_ratio_norm_written_from_its_definition():
    # RatioNorm removes the noise-independent bias: ρ̂ = exp(mean_D[z·(μ_θ − μ_old)]) when x' = μ_old + s·z
    mu_old, s, z, x, mu, adv = _gaussian()
    eps, dt = 2e-3, -0.07
    lp, old = _log_prob(x, mu, s), _log_prob(x, mu_old, s)
    per, ratio, bias = guard_loss(lp, old, mu, mu_old, s, adv, eps, dt)
    want_ratio = torch.exp((z * (mu - mu_old)).mean(1))
    want = torch.maximum(-adv * want_ratio, -adv * want_ratio.clamp(1 - eps, 1 + eps)) / abs(dt)
    torch.testing.assert_close(ratio, want_ratio, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(per, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_grad(per.sum(), mu), _grad(want.sum(), mu), rtol=1e-10, atol=1e-12)
    # and the public codes' form (verl-omni, Flow-Factory): exp(log ρ·s + mse/(2s))
    code = torch.exp((lp - old) * s + ((mu - mu_old) ** 2).mean(1) / (2 * s))
    torch.testing.assert_close(ratio, code, rtol=1e-10, atol=1e-12)
    assert bool((bias > 0).all()) and 0 < int(((ratio - 1).abs() > eps).sum()) < len(ratio)  # both branches


def test_guard_without_reweight_and_with_sum_reduction():
    mu_old, s, z, x, mu, adv = _gaussian(seed=1)
    lp = Normal(mu, s[:, None].expand_as(mu)).log_prob(x).sum(1)
    old = Normal(mu_old, s[:, None].expand_as(mu)).log_prob(x).sum(1)
    per, ratio, _ = guard_loss(lp, old, mu, mu_old, s, adv, 1e-2, -0.1, reduction="sum", reweight=False)
    want_ratio = torch.exp((z * (mu - mu_old)).sum(1))
    torch.testing.assert_close(ratio, want_ratio, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(per, torch.maximum(-adv * want_ratio, -adv * want_ratio.clamp(0.99, 1.01)))


# ----------------------------------------------------------------------------- Flow-DPPO
def test_dppo_divergence_is_the_closed_form_gaussian_kl():
    mu_old, s, _, _, mu, _ = _gaussian(seed=2)
    sd = s[:, None].expand_as(mu)
    kl = kl_divergence(Normal(mu_old, sd), Normal(mu.detach(), sd)).sum(1)           # nats over all D dims
    d = mu.shape[1]
    torch.testing.assert_close(mean_gap(mu.detach(), mu_old, s), kl / d, rtol=1e-12, atol=0)
    torch.testing.assert_close(mean_gap(mu.detach(), mu_old, s, "sum"), kl, rtol=1e-12, atol=0)


def test_dppo_mask_and_gradient_match_the_papers_rule():
    mu_old, s, _, x, mu, adv = _gaussian(seed=3)
    lp, old = _log_prob(x, mu, s), _log_prob(x, mu_old, s)
    kl = kl_divergence(Normal(mu_old, s[:, None].expand_as(mu)), Normal(mu.detach(), s[:, None].expand_as(mu)))
    kl = kl.mean(1)
    delta = float(kl.median())  # half the transitions outside the region
    per, ratio, div, drop = dppo_loss(lp, old, mu, mu_old, s, adv, delta)
    rho = torch.exp(lp - old)
    want_drop = (kl >= delta) & (((rho > 1) & (adv > 0)) | ((rho < 1) & (adv < 0)))
    want = torch.where(want_drop, torch.zeros_like(rho), -adv * rho)
    assert torch.equal(drop, want_drop) and 0 < int(drop.sum()) < int((kl >= delta).sum()) + 1
    torch.testing.assert_close(per, want, rtol=1e-12, atol=1e-14)
    g = _grad(per.sum(), mu)
    torch.testing.assert_close(g, _grad(want.sum(), mu), rtol=1e-10, atol=1e-12)
    # a dropped transition gives no gradient; a kept one is Flow-GRPO's unclipped −A·∇ρ
    assert float(g[drop].abs().max()) == 0.0 and float(g[~drop].abs().max()) > 0


# ----------------------------------------------------------------------------- DGPO
def _dgpo_case(seed=4):
    g = torch.Generator().manual_seed(seed)
    gid = torch.tensor([0, 0, 0, 1, 1, 1])
    adv = torch.tensor([1.2, -0.4, -0.8, 0.9, 0.1, -1.0], **D64)
    u = torch.randn(6, 7, generator=g, **D64)
    v_ref = u + 0.3 * torch.randn(6, 7, generator=g, **D64)
    v = (v_ref + 0.05 * torch.randn(6, 7, generator=g, **D64)).requires_grad_(True)
    return gid, adv, u, v_ref, v


def test_dgpo_group_weight_and_gradient_follow_the_group_preference_loss():
    # the paper: ℓ_g = −log σ(R(G⁺) − R(G⁻)), R(G) = Σ |A|·r, r = −β·(m_θ − m_ref)/G (the code's 1/G)
    gid, adv, u, v_ref, v = _dgpo_case()
    beta, G, N = 30.0, 3, 6
    m, m_ref = matching_loss(v, u), matching_loss(v_ref, u)
    r = -beta * (m - m_ref) / G
    pos, neg = adv > 0, adv < 0
    ell = []
    for grp in (0, 1):
        on = gid == grp
        margin = (adv.abs() * r)[on & pos].sum() - (adv.abs() * r)[on & neg].sum()
        ell.append(-torch.nn.functional.logsigmoid(margin))
    paper = torch.stack(ell).sum()
    w = group_weights(adv[:, None], m.detach()[:, None], m_ref[:, None], torch.ones(6, 1, dtype=torch.bool), gid, 2,
                      beta)[:, 0]
    # σ(s) = 1 − σ(margin) = 1 − exp(−ℓ_g)
    torch.testing.assert_close(w, 1 - torch.exp(-torch.stack(ell).detach()), rtol=1e-12, atol=1e-14)
    ours = (w[gid] * adv * m).sum() / N                                   # the objective's surrogate
    torch.testing.assert_close(_grad(ours, v), _grad(paper, v) * G / (beta * N), rtol=1e-10, atol=1e-14)


def test_dgpo_group_sum_is_over_ranks():
    gid, adv, u, v_ref, v = _dgpo_case(seed=5)
    m, m_ref, on = matching_loss(v.detach(), u), matching_loss(v_ref, u), torch.ones(6, 1, dtype=torch.bool)
    whole = group_weights(adv[:, None], m[:, None], m_ref[:, None], on, gid, 2, 10.0)
    halves = [slice(0, 2), slice(2, 6)]  # two "ranks" holding parts of both groups
    parts = []

    def reduce_sum(t):  # what Dist.all_reduce_sum does over the two parts
        parts.append(t.clone())
        return t if len(parts) < 2 else parts[0] + parts[1]
    for h in halves:
        last = group_weights(adv[h, None], m[h, None], m_ref[h, None], on[h], gid[h], 2, 10.0, reduce_sum)
    torch.testing.assert_close(last, whole)


# ----------------------------------------------------------------------------- the objectives on the embedded model
def _setup(kind, *overrides, kernel="flow_grpo"):
    torch.manual_seed(0)
    cfg = config.load(None, None, [f"objective.kind={kind}", *overrides])
    policy = EmbeddedPolicy(mode="lora", lora_rank=4, lora_alpha=8.0)
    params = policy.trainable_parameters()
    with torch.no_grad():
        for p in params:
            p.add_(0.02 * torch.randn_like(p))
    sig = make_sigmas(4, 3.0)
    ctx = Context(policy=policy, sigmas=sig, kernel=KERNELS[kernel], guidance=1.0, noise_level=0.7,
                  reduction="mean", seed=0, params=params)
    return policy, params, sig, build_objective(kind, ctx, cfg)


def _grads(obj, params, b, count=None):
    for p in params:
        p.grad = None
    stats = obj.chunk_loss(b, b.chunks.rows[0], float(b.train.sum()) if count is None else count)
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params], stats


def _step_gaussian(policy, sig, b, t=1):
    x = b.states[:, t]
    v = policy.velocity(x, torch.full((x.shape[0],), float(sig[t])), b.cond, 1.0)
    return KERNELS["flow_grpo"](x, v, float(sig[t]), float(sig[t + 1]), 0.7, sample=b.states[:, t + 1])


@pytest.mark.parametrize("kind", ["grpo_guard", "flow_dppo"])
def test_first_pass_ratio_is_one_and_gradient_is_the_reference(kind):
    policy, params, sig, obj = _setup(kind, "loss.clip_range=1e-3")
    b = _batch(policy, sig, 0.0)
    b.adv[:] = torch.tensor([1.0, -0.5, 0.25, -2.0])[:, None]
    obj.begin(b, 0)
    got, stats = _grads(obj, params, b)
    assert float(stats[0].ratio_sum) == 4.0 and float(stats[0].ratio_max) == 1.0  # exactly 1 on policy
    st = _step_gaussian(policy, sig, b)
    a, dt = b.adv[:, 1], float(sig[2] - sig[1])
    mu_old, s = st.mean.detach(), st.std
    if kind == "grpo_guard":  # on policy ρ̂ = exp(mean_D z·(μ_θ − μ_old)), no clip active: ∇ = −A·∇ρ̂/|dt|
        z = (b.states[:, 2] - mu_old) / s.view(-1, 1, 1, 1)
        ref = (-a * torch.exp((z * (st.mean - mu_old)).flatten(1).mean(1)) / abs(dt)).sum() / 4
        assert float(stats[0].bias_sum) == 0.0
    else:  # D = 0 < δ: nothing masked, Flow-GRPO's unclipped −A·∇ρ
        ref = (-a * torch.exp(st.log_prob - b.old_log_probs[:, 1])).sum() / 4
        assert float(stats[0].divergence_sum) == 0.0 and float(stats[0].masked) == 0.0
    want = [torch.zeros_like(p) if w is None else w for p, w in
            zip(params, torch.autograd.grad(ref, params, allow_unused=True))]
    scale = max(float(w.abs().max()) for w in want)
    for g, w in zip(got, want):  # float32, two routes: 1e-5 of the largest gradient entry
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * scale)
    obj.end(0)


def test_dppo_divergence_after_a_step_is_the_kl_of_the_two_step_gaussians():
    policy, params, sig, obj = _setup("flow_dppo", "objective.dppo_threshold=0")
    b = _batch(policy, sig, 1.0)
    obj.begin(b, 0, first=[])  # the chunk is not in minibatch 0: μ_old from begin's pass, at these weights
    with torch.no_grad():
        old = _step_gaussian(policy, sig, b)
        for p in params:  # what an optimizer step does before minibatch 1
            p.add_(0.01 * torch.randn_like(p))
        new = _step_gaussian(policy, sig, b)
    _, stats = _grads(obj, params, b)
    d = old.mean[0].numel()
    sd = old.std.double().view(-1, 1).expand(4, d)
    kl = kl_divergence(Normal(old.mean.double().flatten(1), sd), Normal(new.mean.double().flatten(1), sd)).sum(1)
    assert float(kl.min()) > 0
    assert float(stats[0].divergence_sum) == pytest.approx(float((kl / d).sum()), rel=1e-4)
    assert float(stats[0].divergence_max) == pytest.approx(float((kl / d).max()), rel=1e-4)
    assert float(stats[0].outside) == 4.0  # δ = 0: every moved step is outside the region
    obj.end(0)


@pytest.mark.parametrize("kind", ["grpo_guard", "flow_dppo", "dgpo"])
def test_zero_advantage_gives_zero_gradient(kind):
    extra = ["objective.ref_beta=0"] if kind == "dgpo" else []
    policy, params, sig, obj = _setup(kind, *extra)
    b = _batch(policy, sig, 0.0).replace(group_ids=torch.tensor([0, 0, 1, 1]))
    obj.begin(b, 0)
    got, _ = _grads(obj, params, b)
    assert all(float(g.abs().max()) == 0.0 for g in got)
    obj.end(0)


def test_dgpo_first_ratio_is_one_and_gradient_is_the_weighted_matching_gradient():
    policy, params, sig, obj = _setup("dgpo", "objective.ref_beta=0", "objective.dgpo_beta=50")
    b = _batch(policy, sig, 0.0)
    b.adv[:] = torch.tensor([1.0, -1.0, 0.5, -0.5])[:, None]
    b = b.replace(group_ids=torch.tensor([0, 0, 1, 1]))
    obj.begin(b, 0)
    got, stats = _grads(obj, params, b)
    assert float(stats[0].ratio_sum) == 4.0 and float(stats[0].clipped) == 0.0
    s = float(sig[1])
    eps, x0 = obj.noise[:, 1], b.final
    x = (1 - s) * x0 + s * eps
    v = policy.velocity(x, torch.full((4,), s), b.cond, 1.0)
    with torch.no_grad(), policy.disable_adapter():
        v_ref = policy.velocity(x, torch.full((4,), s), b.cond, 1.0)
    m = ((v.double() - (eps - x0).double()) ** 2).flatten(1).mean(1)
    m_ref = ((v_ref.double() - (eps - x0).double()) ** 2).flatten(1).mean(1)
    a = b.adv[:, 1].double()
    gsum = torch.stack([(a * (m.detach() - m_ref))[:2].sum(), (a * (m.detach() - m_ref))[2:].sum()])
    w = torch.sigmoid(50.0 * gsum / 2)[torch.tensor([0, 0, 1, 1])]
    want = [torch.zeros_like(p) if w_ is None else w_ for p, w_ in
            zip(params, torch.autograd.grad(((w * a * m).sum() / 4).float(), params, allow_unused=True))]
    scale = max(float(w_.abs().max()) for w_ in want)
    for g, w_ in zip(got, want):
        torch.testing.assert_close(g, w_, rtol=1e-5, atol=1e-5 * scale)
    assert torch.equal(obj.noise[0], obj.noise[1]) and not torch.equal(obj.noise[0], obj.noise[2])  # group ε
    obj.end(0)


def test_dgpo_samples_with_the_old_copy_from_old_sampling_from():
    policy, params, sig, obj = _setup("dgpo", "objective.old_ramp=0.5", "objective.old_sampling_from=3")
    with torch.no_grad():  # θ_old ≠ θ, as after a few iterations with η > 0
        for s_ in obj.old.shadow:
            s_.add_(0.1)
    live, old = [p.detach().clone() for p in params], [s_.clone() for s_ in obj.old.shadow]
    with obj.sampling(2):
        assert all(torch.equal(p, q) for p, q in zip(params, live))
    with obj.sampling(3):  # (the swap exchanges the storages: the shadow holds the live weights meanwhile)
        assert all(torch.equal(p, s_) for p, s_ in zip(params, old))
    assert all(torch.equal(p, q) for p, q in zip(params, live))


# ----------------------------------------------------------------------------- the plan and the presets
def test_random_steps_draws_k_distinct_steps_of_the_range_shared_by_the_batch():
    plan = build_plan("random_steps", make_sigmas(10, 3.0), num_steps=4, window_range=(0, 5))
    seen = set()
    for it in range(20):
        out = plan(it, 6, torch.arange(6) // 3, torch.Generator().manual_seed(it))
        row = out.train[0]
        assert torch.equal(out.train, out.sde) and bool((out.train == row).all())
        assert int(row.sum()) == 4 and not bool(row[5:].any())
        seen.add(tuple(row.nonzero().flatten().tolist()))
    assert len(seen) == 5  # every 4-subset of 5 shows up


def test_random_steps_config_says_what_is_wrong():
    with pytest.raises(ConfigError, match="plan.num_steps=6 is more than the 5 steps"):
        config.load(None, "flow_dppo", ["plan.num_steps=6"])


def test_flow_grpo_fast_is_a_preset_of_existing_parts():
    o = PRESETS["flow_grpo_fast"].overrides
    assert o["plan.kind"] == "random_window" and "objective.kind" not in o
    cfg = config.load(None, "flow_grpo_fast", [])
    plan = build_plan("random_window", make_sigmas(10, 3.0), window_min=2, window_max=2, window_range=(0, 5))
    for it in range(10):
        out = plan(it, 4, torch.zeros(4, dtype=torch.long), torch.Generator().manual_seed(it))
        steps = out.train[0].nonzero().flatten().tolist()
        assert len(steps) == 2 and steps[1] == steps[0] + 1 and steps[1] <= 4
    assert cfg.sample.shared_noise and cfg.plan.window_size == 2


# ----------------------------------------------------------------------------- combinations
COMBOS = [
    ("dgpo", []),
    ("dgpo", ["plan.kind=sliding_window", "plan.strategy=frozen", "plan.window_size=2", "solver.kind=dpm2m",
              "solver.compression=0.5"]),
    ("dgpo", ["replay.k=1", "replay.tail=regenerate", "replay.rule=always", "objective.dgpo_reference=old",
              "objective.old_sampling_from=1"]),
    ("dgpo", ["advantage.kind=stepwise", "sample.shared_noise=true", "advantage.substeps=2", "reward.overlap=true"]),
    ("grpo_guard", ["plan.kind=sliding_window", "plan.window_size=2", "solver.kind=dpm2m", "solver.compression=0.5"]),
    ("grpo_guard", ["replay.k=1", "replay.rule=always", "replay.is_correction=per_step", "train.minibatches=1"]),
    ("grpo_guard", ["advantage.kind=stepwise", "sample.shared_noise=true", "advantage.substeps=2", "loss.kl_beta=0.01",
                    "train.inner_epochs=2"]),
    ("flow_dppo", ["replay.k=1", "replay.rule=always", "replay.tail=regenerate"]),
    ("flow_dppo", ["advantage.kind=stepwise", "sample.shared_noise=true", "advantage.substeps=2", "reward.overlap=true"]),
    ("flow_dppo", ["plan.kind=sliding_window", "plan.strategy=frozen", "plan.window_size=2", "solver.kind=dpm2m",
                   "solver.compression=0.5"]),
    # a per-row plan whose update forwards only the rows that train each step (μ_old of a subset)
    ("flow_dppo", ["plan.kind=random_subset", "plan.subset_fraction=0.5", "loss.forward_rows=trained",
                   "objective.dppo_threshold=0"]),
    ("flow_grpo_fast", ["replay.k=1", "replay.rule=always", "advantage.kind=stepwise", "advantage.substeps=2"]),
    ("flow_grpo_fast_cps", ["reward.overlap=true"]),
]


@pytest.mark.parametrize("preset,extra", COMBOS)
def test_new_parts_train_with_the_rollout_parts(tmp_path, tiny, preset, extra):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a handwritten 7\n")
    steps = ["plan.num_steps=2"] if PRESETS[preset].overrides.get("plan.kind") == "random_steps" else []
    tr = Trainer(config.load(None, preset, tiny + [f"sample.prompts_file={prompts}", *steps, *extra]), tmp_path / "r")
    before = [p.detach().clone() for p in tr.params]
    recs = []
    for it in range(2):
        tr.iteration = it
        recs.append(tr.train_iteration(it))
    assert all(math.isfinite(r["loss/policy"]) for r in recs)
    assert any(not torch.equal(a, p) for a, p in zip(before, tr.params))
    if "replay.k=1" in extra:
        assert recs[1]["replay/admitted"] > 0


@pytest.mark.parametrize("preset", ["dgpo", "grpo_guard", "flow_dppo"])
def test_new_presets_resume_bit_exactly(tmp_path, tiny, preset):
    extra = ["plan.num_steps=2"] if preset != "grpo_guard" else []
    if preset == "dgpo":
        extra += ["objective.old_ramp=0.3", "objective.old_sampling_from=2"]
    full = Trainer(config.load(None, preset, tiny + ["train.iterations=3", *extra]), tmp_path / "a")
    full.run()
    part = Trainer(config.load(None, preset, tiny + ["train.iterations=2", *extra]), tmp_path / "b")
    part.run()
    cfg = config.load(str(tmp_path / "b" / "config.yaml"), None, ["train.iterations=3"], keep_resolved=True)
    resumed = Trainer(cfg, tmp_path / "b", resume=True)
    resumed.run()
    for k, v in full.policy.trainable_state_dict().items():
        assert torch.equal(v, resumed.policy.trainable_state_dict()[k]), k
