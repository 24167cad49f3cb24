"""The parts as plain objects on a global batch (no processes): advantage estimators, replay
selection and extension, the builder's registries, the exclusive-field errors."""
import pytest
import torch

from flowpo import config
from flowpo.advantages import ESTIMATORS, aggregate_advantages
from flowpo.config import ConfigError
from flowpo.replay import NoReplay, OPReplay
from flowpo.rewards import RewardSet
from flowpo.schedule import sigmas as make_sigmas
from flowpo.trajectory import Chunks, Trajectory, cat, update_rows


class OneRank:  # the Dist interface the replay part and the update rows use, for one process
    world, rank, is_main, lockstep = 1, 0, True, False

    def all_gather_objects(self, obj):
        return [obj]

    def all_reduce_sum(self, t):
        return t

    def local_chunks(self, global_chunks, local):
        from flowpo.training.distributed import Dist

        return Dist.local_chunks(self, global_chunks, local)


def _rows(n=8, T=4, group_size=4, seed=0, it=0):
    g = torch.Generator().manual_seed(seed)
    lp = torch.randn(n, T, generator=g)
    return Trajectory(prompts=[f"a handwritten {i // group_size}" for i in range(n)], metadata=[{}] * n,
                      group_ids=torch.arange(n) // group_size, row_ids=torch.arange(n),
                      versions=torch.full((n,), it), raw=torch.rand(n, 1, generator=g),
                      train=torch.ones(n, T, dtype=torch.bool).index_fill_(1, torch.tensor([T - 1]), False),
                      states=torch.randn(n, T + 1, 1, 4, 4, generator=g), log_probs=lp, old_log_probs=lp,
                      old_known=torch.ones(n, T, dtype=torch.bool), weights=torch.ones(n, T),
                      final=torch.randn(n, 1, 4, 4, generator=g))


def test_group_estimator_is_the_group_z_score_of_fresh_and_replayed_rows():
    cfg = config.load(None, "flow_grpo", [])
    rewards = RewardSet(["digit_alignment"], [1.0])
    fresh = _rows()
    rep = Trajectory(prompts=["a handwritten 0", "a handwritten 1"], metadata=[{}, {}], raw=torch.tensor([[0.9], [0.1]]),
                     group_ids=torch.tensor([0, 1]), train=torch.ones(2, 4, dtype=torch.bool))
    adv, _ = ESTIMATORS["group"](cfg, rewards).estimate(cat([fresh, rep]))
    want = aggregate_advantages(torch.cat([fresh.raw, rep.raw]), rewards.weights,
                                torch.cat([fresh.group_ids, rep.group_ids]), aggregation="sum_then_normalize",
                                std="global")
    assert adv.shape == (10, 4)
    assert torch.equal(adv, want[:, None].expand(-1, 4))


def test_no_replay_leaves_the_rows_alone():
    r, rows = NoReplay(), _rows()
    assert r.k == 0 and r.extend(0, rows) == (rows, {}, 0) and r.observe(0, rows) == {}


def _op_replay(*overrides):
    cfg = config.load(None, "op_grpo", ["sample.steps=4", "sample.group_size=4", *overrides])
    sig = make_sigmas(4, 3.0)
    rewards = RewardSet(["digit_alignment"], [1.0])
    return cfg, OPReplay(cfg, sig, policy=None, rewards=rewards, dist=OneRank(), device="cpu")


def test_replay_selects_on_the_global_rows_and_the_update_takes_them():
    cfg, rep = _op_replay("replay.rule=always", "replay.truncate=none", "replay.capacity_per_prompt=2",
                          "replay.store=best", "replay.tail=drop")
    old = _rows(seed=1)
    rep.observe(0, old)                        # iteration 0's rows enter the buffer
    assert len(rep.buffer) == 4                # capacity 2 per prompt, 2 prompts
    fresh = _rows(seed=2, it=1)
    rows, stats, nfe = rep.extend(1, fresh)
    assert stats["replay/admitted"] == rows.n - fresh.n == 2 and nfe == 0   # k = 1 per group, 2 groups
    best0 = int(old.raw[:4, 0].argmax())
    assert torch.equal(rows.final[fresh.n], old.final[best0])             # the final latent travels with it
    assert torch.equal(rows.states[fresh.n, :4], old.states[best0, :4])   # the states the kept steps 0-2 touch
    assert not rows.states[fresh.n, 4].any()                               # (none stored past them)
    assert rows.raw.shape == (10, 1) and rows.group_ids.tolist()[-2:] == [0, 1]
    assert rows.row_ids.tolist()[-2:] == [8, 9] and rows.versions.tolist()[-2:] == [0, 0]
    assert not rows.old_known[fresh.n:].any() and rows.rule is rep.weight_rule   # π_old: the objective's
    n, T = fresh.n, 4
    mine = fresh.replace(cond={"tokens": torch.zeros(n, 2)}, chunks=Chunks([torch.arange(n)], [0], 1))
    rows = rows.replace(adv=torch.arange(n + 2, dtype=torch.float32)[:, None].expand(-1, T))
    b = update_rows(mine, rows, n, OneRank(), lambda p, m: {"tokens": torch.ones(len(p), 2)}, batch_size=8)
    assert b.n == n + 2 and b.chunks.total == 2 and b.chunks.ids == [0, 1] and b.chunks.rows[1].tolist() == [n, n + 1]
    assert b.row_ids.tolist()[-2:] == [n, n + 1] and b.adv[-2:, 0].tolist() == [n, n + 1]
    assert torch.equal(b.weights[-2:], torch.ones(2, T))             # 1 until an objective applies the rule
    assert torch.equal(b.cond["tokens"][-2:], torch.ones(2, 2))       # the replayed prompts, encoded


@pytest.mark.parametrize("preset", ["op_grpo", "flowpo_best", "flowpo_mix", "flowpo_mix_p16", "flowpo_fast",
                                    "flowpo_flash", "flowpo_flash2", "flowpo_nft", "flowpo_awm"])
def test_replay_presets_admit_replayed_rows(tmp_path, tiny, preset):
    from flowpo.training.trainer import Trainer

    prompts = tmp_path / "p.txt"
    prompts.write_text("a handwritten 7\n")  # one prompt: every group finds the buffer's entry
    cfg = config.load(None, preset, tiny + [f"sample.prompts_file={prompts}", "replay.rule=always",
                                            "plan.window_size=2", "sample.prompts_per_iteration=2"])
    tr = Trainer(cfg, tmp_path / "r")
    tr.train_iteration(0)
    tr.iteration = 1
    rec = tr.train_iteration(1)
    assert rec["replay/admitted"] > 0 and rec["replay/entries"] > 0


def test_exclusive_fields_are_one_line_errors():
    # truncation is one choice field (truncate + truncate_at); the old pair of keys still reads, the
    # last one set wins, and a null turns off only the choice it names (an old config.yaml's pair)
    r = config.load(None, "op_grpo", ["replay.truncate_fraction=0.3"]).replay
    assert (r.truncate, r.truncate_at) == ("fraction", 0.3)
    r = config.load(None, "op_grpo", ["replay.truncate_fraction=0.3", "replay.truncate_sigma=null"]).replay
    assert (r.truncate, r.truncate_at) == ("fraction", 0.3)
    r = config.load(None, "op_grpo", ["replay.truncate_sigma=null"]).replay
    assert r.truncate == "none"
    p = config.load(None, None, ["plan.truncate_sigma=0.2", "plan.truncate_fraction=0.25"]).plan
    assert (p.truncate, p.truncate_at) == ("fraction", 0.25)
    with pytest.raises(ConfigError, match="replay.truncate='sigmaa' is not allowed"):
        config.load(None, None, ["replay.truncate=sigmaa"])
    with pytest.raises(ConfigError, match="replay.enabled was removed.*replay.k"):
        config.load(None, None, ["replay.enabled=true"])


@pytest.mark.parametrize("key,module", [("sample.kernel", "flowpo.sde:KERNELS"), ("plan.kind", "flowpo.plans:PLANS"),
                                        ("solver.kind", "flowpo.solvers:TAILS"),
                                        ("advantage.kind", "flowpo.advantages:ESTIMATORS")])
def test_registries_are_the_config_s_allowed_values(key, module):
    import importlib

    mod, _, attr = module.partition(":")
    assert config.choices(key) == list(getattr(importlib.import_module(mod), attr))
    with pytest.raises(ConfigError, match=f"{key}='nope' is not allowed"):
        config.load(None, None, [f"{key}=nope"])


def test_flowpo_config_prints_every_key_with_its_help(capsys):
    from flowpo.cli import main

    assert main(["config", "--preset", "awm"]) == 0
    out = capsys.readouterr().out
    keys = config.describe(config.load(None, "awm", []))
    assert len(keys) > 90
    for key, _typ, _val, _allowed, doc in keys:
        assert f"\n{key} (" in "\n" + out, key
        assert doc, f"{key} has no docstring"
    assert "objective.kind (str) = 'awm'   allowed: clipped_surrogate, diffusion_nft, awm" in out


def test_no_import_circle_between_config_presets_and_checks():
    import subprocess
    import sys

    code = "import flowpo.presets, flowpo.config_checks, sys; " \
           "assert 'flowpo.config' not in sys.modules, sorted(m for m in sys.modules if m.startswith('flowpo'))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
