"""Issue 29, item 1: the successors (AWM, DiffusionNFT) and MixGRPO-Flash run as their authors' code
runs them: AWM's stratified σ plan, NFT's 2nd-order DPM rollout, MixGRPO's post-window solver, and
the refusal of CFG for a CFG-free objective."""
import math

import pytest
import torch

from flowpo import config
from flowpo.config import ConfigError
from flowpo.plans import Stratified, build_plan
from flowpo.schedule import sigmas as make_sigmas
from flowpo.solvers import Multistep, compressed_sigmas, compressed_steps, dpm2m


def _authors_awm_indices(T, fraction, k, first, u):
    """scxue/advantage_weighted_matching train_sd3_awm.py, time_type discrete_wo_init (first = 1) and
    discrete (first = 0), written out again here from their description: strata of linspace(first,
    int(T·f), k + 1) truncated to integers, one index per stratum from u."""
    b = torch.linspace(first, int(T * fraction), k + 1)
    lo, hi = b[:-1].long(), b[1:].long()
    return (lo + (u * (hi - lo)).long()).tolist()


def test_awm_plan_matches_the_authors_draw_and_never_trains_sigma_one():
    grid = make_sigmas(14, 3.0)
    plan = Stratified(grid, count=6, first=1, fraction=0.9)
    seen = set()
    for it in range(200):
        g, g2 = torch.Generator().manual_seed(it), torch.Generator().manual_seed(it)
        out = plan(it, 5, torch.arange(5), g)
        picked = torch.nonzero(out.train[0]).flatten().tolist()
        assert picked == sorted(_authors_awm_indices(14, 0.9, 6, 1, torch.rand(6, generator=g2)))
        assert torch.equal(out.train, out.train[:1].expand(5, -1))  # shared by every row
        assert not out.train[:, 0].any() and len(picked) == 6        # never σ = 1; one per stratum
        seen.update(picked)
        strata = [[1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]     # the authors' strata on 14 steps
        assert all(sum(i in s for i in picked) == 1 for s in strata)
    assert seen == set(range(1, 12))  # every step of 1-11 is reachable


def test_awm_plan_first_zero_is_the_authors_pickscore_mode_and_bad_counts_are_refused():
    grid = make_sigmas(14, 3.0)
    plan = build_plan("stratified", grid, strata=6, strata_first=0, train_fraction=0.9)
    hits = sum(bool(plan(it, 2, torch.arange(2), torch.Generator().manual_seed(it)).train[0, 0]) for it in range(100))
    assert 20 < hits < 80  # step 0 is half of the first stratum {0, 1}
    short = Stratified(make_sigmas(10, 3.0), count=9, first=1, fraction=0.9)  # only steps 1-8 exist: all train
    assert torch.nonzero(short(0, 1, torch.arange(1), torch.Generator()).train[0]).flatten().tolist() == list(range(1, 9))
    with pytest.raises(ConfigError, match=r"^plan\.strata_first=9 is out of range"):
        config.load(None, "awm", ["plan.strata_first=9"])
    with pytest.raises(ConfigError, match=r"^plan\.strata=0 is out of range"):
        config.load(None, "awm", ["plan.strata=0"])


def test_awm_preset_trains_stratified_steps_and_its_ablation_keeps_the_random_half():
    cfg = config.load(None, "awm", [])
    assert (cfg.plan.kind, cfg.plan.strata, cfg.plan.strata_first) == ("stratified", 4, 1)
    assert (cfg.objective.ref_beta, cfg.train.minibatches, cfg.sample.guidance) == (0.001, 1, 1.0)
    old = config.load(None, "awm_random_subset", [])
    assert (old.plan.kind, old.plan.subset_fraction) == ("random_subset", 0.5)


def test_multistep_along_a_grid_is_dpm2m_and_a_warm_tail_continues_it():
    torch.manual_seed(0)
    a = torch.randn(3, 4)

    def vel(x, sigma):  # a smooth nonlinear field
        return torch.tanh(x * a) - 0.3 * sigma.view(-1, 1) * x

    grid = make_sigmas(10, 3.0)
    x0 = torch.randn(3, 4)
    whole, _ = dpm2m(vel, x0, grid)
    hist, x = Multistep(), x0
    for t in range(4):  # the rollout's grid steps, then the tail from σ_4 with the history
        s, s2 = float(grid[t]), float(grid[t + 1])
        x = hist.step(x, vel(x, torch.full((3,), s)), s, s2)
    warm, _ = dpm2m(vel, x, grid[4:], hist.history)
    cold, _ = dpm2m(vel, x, grid[4:])
    assert torch.allclose(warm, whole, atol=1e-6, rtol=0)
    assert (cold - whole).abs().max() > 1e-4  # the restart is first order on its first step


@pytest.mark.parametrize("n,ratio", [(8, 0.4), (9, 0.4), (20, 0.4), (21, 0.4), (21, 0.2), (7, 0.2), (3, 0.4),
                                     (1, 0.4), (24, 1.0)])
def test_mixgrpo_step_rule_is_the_length_of_mixgrpo_s_post_window_schedule(n, ratio):
    # MixGRPO's code: num_post_steps = int(max((S − 1 − e)·r, 1)) points, S − 1 − e = n + 1 for n remaining
    # steps; linspace(t_e, 0, P) has P − 1 steps. flowpo takes at least one step where that is 0.
    points = int(max((n + 1) * ratio, 1))
    assert compressed_steps(n, ratio, "mixgrpo") == max(1, points - 1)
    assert compressed_steps(n, ratio, "ceil") == math.ceil(round(n * ratio, 9))
    assert compressed_steps(0, ratio, "mixgrpo") == 0


def test_mix_grpo_flash_preset_takes_mixgrpo_s_tail_and_the_ablation_flowpo_s(tmp_path, tiny):
    from flowpo.training.trainer import Trainer

    counts = {}
    for preset in ("mix_grpo_flash", "mix_grpo_flash_restart"):
        cfg = config.load(None, preset, tiny + ["sample.steps=10", "plan.window_size=2", "eval.every=0"])
        tr = Trainer(cfg, tmp_path / preset)
        rec = tr.train_iteration(0)
        counts[preset] = rec["nfe"] / (cfg.sample.prompts_per_iteration * cfg.sample.group_size)
    # window [0, 2) then n = 8 remaining steps: 2 + (int(9·0.4) − 1 = 2) against 2 + ⌈8·0.4⌉ = 4
    assert counts == {"mix_grpo_flash": 4, "mix_grpo_flash_restart": 6}


def test_nft_rollout_is_the_2m_solver_over_the_grid(tmp_path, tiny):
    from flowpo.solvers import solve
    from flowpo.rollout import chunked_velocity
    from flowpo.training.trainer import Trainer

    cfg = config.load(None, "diffusion_nft", tiny + ["sample.steps=6"])
    assert cfg.solver.grid == "dpm2m"
    tr = Trainer(cfg, tmp_path / "r")
    ro = tr.parts.rollout
    heads = ro.heads(0)
    rows, _ = ro.rows(0, heads, torch.full((len(heads),), cfg.sample.group_size))
    traj, _ = ro.sample(0, rows)
    x_init = traj.states[:, 0]
    vel = chunked_velocity(ro.policy, traj.cond, [torch.arange(rows.n)], 1.0)
    with ro.sampling():
        want, _ = solve("dpm2m", vel, x_init, ro.sigmas)
        euler, _ = solve("euler", vel, x_init, ro.sigmas)
    assert torch.allclose(traj.final, want, atol=1e-5, rtol=0)
    assert torch.allclose(traj.states[:, -1], traj.final)  # the grid's states are the 2M states
    assert (traj.final - euler).abs().max() > 1e-4


@pytest.mark.parametrize("preset", ["awm", "diffusion_nft"])
def test_cfg_on_a_cfg_free_objective_needs_the_opt_in(preset):
    with pytest.raises(ConfigError) as e:
        config.load(None, preset, ["sample.guidance=4.5"])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("sample.guidance=4.5 turns CFG on for objective.kind=")
    assert "objective.allow_cfg=true" in msg
    assert config.load(None, preset, ["sample.guidance=4.5", "objective.allow_cfg=true"]).sample.guidance == 4.5
    assert config.load(None, "flow_grpo", ["sample.guidance=4.5"]).sample.guidance == 4.5  # likelihood methods: free


def test_cfg_refusal_is_one_line_on_the_command_line(capsys, tmp_path):
    from conftest import cli, one_line

    code, _, err = cli(capsys, "train", "--preset", "awm", "--out", tmp_path / "r", "sample.guidance=4.5")
    assert code == 2 and "objective.allow_cfg=true" in one_line(err)
    assert not (tmp_path / "r").exists()


def test_compressed_sigmas_is_mixgrpo_s_post_schedule():
    # MixGRPO: linspace(linspace(1, 0, T + 1)[e + 1], 0, P) in unshifted time, then shifted
    T, e, shift, P = 10, 1, 3.0, 4
    t = torch.linspace(1, 0, T + 1)[e + 1].item()
    u = torch.linspace(t, 0, P, dtype=torch.float64)
    want = shift * u / (1 + (shift - 1) * u)
    got = compressed_sigmas(float(make_sigmas(T, shift)[e + 1]), 0.0, P - 1, shift)
    assert torch.allclose(got.double(), want, atol=1e-6)
