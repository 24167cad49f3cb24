"""Trainer properties on the embedded model with a tiny budget (seconds)."""
import json
import math

import pytest
import torch

from flowpo import config
from flowpo.presets import PRESETS
from flowpo.training.trainer import Trainer


def make(tmp_path, tiny, *extra, preset=None, name="run"):
    cfg = config.load(None, preset, tiny + list(extra))
    return Trainer(cfg, tmp_path / name)


def test_on_policy_ratio_is_exactly_one(tmp_path, tiny):
    # one minibatch: every transition is scored before any update → ρ == 1 bit-exactly
    tr = make(tmp_path, tiny, "train.minibatches=1", "sample.guidance=4.5")
    rec = tr.train_iteration(0)
    assert rec["stats/ratio_mean"] == 1.0
    assert rec["stats/ratio_max"] == 1.0
    assert rec["stats/clipfrac"] == 0.0
    assert rec["stats/transitions"] == 8 * 3  # N=8 rows × (T−1)=3 trained steps


@pytest.mark.parametrize("preset", ["dance_grpo", "mix_grpo_flash", "stepwise_grpo"])
def test_on_policy_ratio_is_exactly_one_for_other_presets(tmp_path, tiny, preset):
    tr = make(tmp_path, tiny, "train.minibatches=1", "plan.window_size=2", preset=preset)
    rec = tr.train_iteration(0)
    assert rec["stats/ratio_max"] == 1.0 and rec["stats/ratio_mean"] == 1.0


def test_zero_advantages_give_zero_policy_gradient(tmp_path, tiny):
    tr = make(tmp_path, tiny, "train.minibatches=1")
    captured = {}
    orig = tr._update

    def spy(b):
        b.adv.zero_()
        tr.opt.step = lambda *a, **k: captured.setdefault("grads", [p.grad.clone() for p in tr.params])
        return orig(b)

    tr._update = spy
    tr.train_iteration(0)
    assert captured["grads"] and all(torch.count_nonzero(g) == 0 for g in captured["grads"])


def test_nonzero_advantages_move_the_weights(tmp_path, tiny):
    tr = make(tmp_path, tiny, "train.weight_decay=0", "reward.names=[stroke_quality]")
    before = [p.detach().clone() for p in tr.params]
    rec = tr.train_iteration(0)
    assert rec["stats/grad_norm"] > 0
    assert any(not torch.equal(a, p) for a, p in zip(before, tr.params))


def test_nfe_counts_every_model_evaluation(tmp_path, tiny):
    # T=4 steps × 8 rows; CFG (guidance ≠ 1) doubles each evaluation
    tr = make(tmp_path, tiny, "sample.guidance=4.5")
    assert tr.train_iteration(0)["nfe"] == 4 * 8 * 2
    tr = make(tmp_path, tiny, "sample.guidance=1.0", name="b")
    assert tr.train_iteration(0)["nfe"] == 4 * 8


def test_run_writes_the_output_contract(tmp_path, tiny):
    tr = make(tmp_path, tiny)
    tr.run()
    out = tmp_path / "run"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "reward_mean" in r]
    eval_rows = [r for r in rows if "eval_reward_mean" in r]
    assert [r["step"] for r in train_rows] == [0, 1]
    assert [r["step"] for r in eval_rows] == [0, 1, 2]  # before the first, every 1, after the last
    for r in train_rows:
        assert {"step", "reward_mean", "reward_std", "nfe", "wall_s"} <= set(r)
    assert (out / "config.yaml").exists() and (out / "report.md").exists()
    cks = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert cks == sorted(cks) and cks[-1] == "iter_000002"
    assert list((out / "checkpoints" / cks[-1]).glob("*.safetensors"))
    assert list((out / "samples").glob("*.png"))
    assert config.load(str(out / "config.yaml")).train.iterations == 2


def test_resume_matches_uninterrupted(tmp_path, tiny):
    base = [x for x in tiny if not x.startswith("train.iterations")]
    full = make(tmp_path, base, "train.iterations=3", name="full")
    full.run()
    part = make(tmp_path, base, "train.iterations=1", name="part")
    part.run()
    cfg = config.load(str(tmp_path / "part" / "config.yaml"), None, ["train.iterations=3"], keep_resolved=True)
    resumed = Trainer(cfg, tmp_path / "part", resume=True)
    assert resumed.iteration == 1
    resumed.run()
    a, b = full.policy.trainable_state_dict(), resumed.policy.trainable_state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("reward_mean") for r in ra] == [r.get("reward_mean") for r in rb]


def test_partial_checkpoint_is_ignored(tmp_path, tiny):
    from flowpo.training import checkpoint

    tr = make(tmp_path, tiny, "train.iterations=1")
    tr.run()
    out = tmp_path / "run"
    # a save killed half-way leaves a .tmp folder; latest() must still give the complete one
    (out / "checkpoints" / "iter_000005.tmp").mkdir()
    (out / "checkpoints" / "iter_000005.tmp" / "trainable.safetensors").write_bytes(b"partial")
    assert checkpoint.latest(out).name == "iter_000001"


def test_existing_run_needs_resume(tmp_path, tiny):
    make(tmp_path, tiny, "train.iterations=1").run()
    with pytest.raises(FileExistsError, match="--resume"):
        make(tmp_path, tiny, "train.iterations=1")


def test_flash_star_pays_only_for_its_window_and_compressed_segment(tmp_path, tiny):
    # T = 10: window w = 2 at l = 0 (2 grid steps), then ⌈(10 − 2)·0.2⌉ = 2 DPM-Solver++ steps → 4 per row
    tr = make(tmp_path, tiny, "sample.steps=10", preset="mix_grpo_flash_star")
    rec = tr.train_iteration(0)
    assert rec["nfe_per_image"] == 4.0
    assert rec["stats/transitions"] == 8 * 2  # only the window's steps are re-scored


@pytest.mark.parametrize("dtype, hint", [("fp32", False), ("bf16", True)])
def test_non_finite_gradient_stops_before_the_step_and_names_the_fixes(tmp_path, tiny, dtype, hint):
    """A NaN gradient raises before the optimizer step (weights untouched); in bf16 the message also
    names the attention-kernel switch (a fused SDPA backward returned NaN for tiny FLUX on a GPU)."""
    tr = Trainer(config.load(None, "flow_grpo", tiny + [f"model.dtype={dtype}"]), tmp_path / "r")
    before = [p.detach().clone() for p in tr.params]
    for p in tr.params:
        p.register_hook(lambda g: g * float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite gradient norm") as err:
        tr.train_iteration(0)
    assert ("model.attention=math" in str(err.value)) == hint
    assert all(torch.equal(a, b) for a, b in zip(before, tr.params))


@pytest.mark.parametrize("schedule, half", [("constant", 1.0), ("linear", 0.55), ("cosine", 0.55)])
def test_lr_schedule_depends_on_the_iteration_only(tmp_path, tiny, schedule, half):
    """lr·(lr_final + (1 − lr_final)·f(it/iterations)): f = 1 − x (linear), (1 + cos πx)/2 (cosine);
    the optimizer uses it and the log records it; AdamW gets train.adam_eps."""
    cfg = config.load(None, "flow_grpo", tiny + ["train.iterations=10", "train.lr=1e-3", "train.lr_final=0.1",
                                                 f"train.lr_schedule={schedule}", "train.adam_eps=1e-6"])
    from flowpo.training.optim import lr_at

    tr = Trainer(cfg, tmp_path / "r")
    assert lr_at(cfg.train, 0) == pytest.approx(1e-3)
    assert lr_at(cfg.train, 5) == pytest.approx(1e-3 * half)
    assert lr_at(cfg.train, 10) == pytest.approx(1e-3 if schedule == "constant" else 1e-4)
    if schedule == "cosine":
        assert lr_at(cfg.train, 2) == pytest.approx(1e-3 * (0.1 + 0.9 * (1 + math.cos(math.pi * 0.2)) / 2))
    tr.iteration = 5
    rec = tr.train_iteration(5)
    assert rec["train/lr"] == pytest.approx(1e-3 * half)
    assert all(g["lr"] == pytest.approx(1e-3 * half) and g["eps"] == 1e-6 for g in tr.opt.param_groups)


def test_minibatches_are_whole_chunks_and_the_cap_is_said(tmp_path, tiny, capsys):
    """8 rows in chunks of 4 → at most 2 minibatches per pass: asking for 4 runs 2 (said once on
    stderr, logged as train/optimizer_steps); chunks of 2 give the 4 asked for."""
    over = ["train.minibatches=4", "train.inner_epochs=2"]
    tr = Trainer(config.load(None, "flow_grpo", tiny + over), tmp_path / "a")
    assert tr.train_iteration(0)["train/optimizer_steps"] == 4.0  # 2 passes × 2
    tr.train_iteration(1)
    assert capsys.readouterr().err.count("train.minibatches=4 but iteration 0 has only 2 rollout chunks") == 1
    tr = Trainer(config.load(None, "flow_grpo", tiny + over + ["sample.batch_size=2"]), tmp_path / "b")
    assert tr.train_iteration(0)["train/optimizer_steps"] == 8.0  # 2 passes × 4
    assert "train.minibatches" not in capsys.readouterr().err


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_trains_two_iterations(tmp_path, tiny, preset):
    """Each shipped preset (methods and ablations) runs on the tiny budget with its own settings
    (window sizes, replay, stepwise credit, passes, schedules): finite stats, weights that move, and
    a held-out evaluation. Two iterations, so replay presets also train on a replayed row set."""
    tr = make(tmp_path, tiny, "sample.steps=10", "train.weight_decay=0", preset=preset)
    before = [p.detach().clone() for p in tr.params]
    recs = [tr.train_iteration(i) for i in range(2)]
    for rec in recs:
        assert rec["stats/transitions"] > 0
        assert all(math.isfinite(v) for k, v in rec.items() if isinstance(v, float)), rec
    assert any(not torch.equal(a, p) for a, p in zip(before, tr.params))
    assert math.isfinite(tr.evaluate()["eval_reward_mean"])


@pytest.mark.parametrize("shared", [True, False])
def test_shared_initial_noise_per_group(tmp_path, tiny, shared, monkeypatch):
    import flowpo.rollout as rollout_mod

    seen = {}
    real = rollout_mod.sample

    def spy(policy, cond, sigmas, spec, **kw):
        seen["x"] = kw["x_init"].clone()
        return real(policy, cond, sigmas, spec, **kw)

    monkeypatch.setattr(rollout_mod, "sample", spy)
    tr = make(tmp_path, tiny, f"sample.shared_noise={str(shared).lower()}")
    rows, _ = tr.parts.rollout.rows(0, tr.parts.rollout.heads(0), torch.full((2,), 4))
    tr.parts.rollout.sample(0, rows)
    x, g = seen["x"], rows.group_ids
    for a in range(len(g)):
        for b in range(len(g)):
            if a != b:
                same = torch.equal(x[a], x[b])
                assert same == (shared and bool(g[a] == g[b])), (a, b)


def test_evaluation_uses_the_ema_weights_and_puts_the_live_ones_back(tmp_path, tiny):
    from flowpo.training.evaluate import evaluate_policy

    tr = make(tmp_path, tiny, "train.ema=0.5", "train.lr=3e-2")
    tr.train_iteration(0)
    live = [p.detach().clone() for p in tr.params]
    assert any(not torch.equal(s, p) for s, p in zip(tr.ema.shadow, live))  # EMA lags the live weights
    rec = tr.evaluate()
    assert all(torch.equal(a, p) for a, p in zip(live, tr.params))          # swapped back, bit for bit
    with torch.no_grad():
        for p, s in zip(tr.params, tr.ema.shadow):
            p.copy_(s)
    ema_rec, _, _ = evaluate_policy(tr.cfg, tr.policy, tr.rewards, tr.parts.eval_prompts, tr.parts.eval_sigmas, tr.device)
    with torch.no_grad():
        for p, a in zip(tr.params, live):
            p.copy_(a)
    live_rec, _, _ = evaluate_policy(tr.cfg, tr.policy, tr.rewards, tr.parts.eval_prompts, tr.parts.eval_sigmas, tr.device)
    assert rec["eval_reward_mean"] == ema_rec["eval_reward_mean"] != live_rec["eval_reward_mean"]


def test_forwarding_only_trained_rows_keeps_the_first_ratio_at_one_within_rounding(tmp_path, tiny):
    # DanceGRPO trains a random subset of steps per row; forwarding only those rows changes the batch
    # of the update's forward, so π_θ is the rollout's up to the matmul's batch-size dependence
    ref = make(tmp_path, tiny, "train.minibatches=1", preset="dance_grpo", name="a").train_iteration(0)
    rec = make(tmp_path, tiny, "train.minibatches=1", "loss.forward_rows=trained", preset="dance_grpo",
               name="b").train_iteration(0)
    assert ref["stats/ratio_max"] == 1.0
    assert abs(rec["stats/ratio_max"] - 1.0) < 1e-5 and abs(rec["stats/ratio_mean"] - 1.0) < 1e-5
    assert rec["stats/transitions"] == ref["stats/transitions"]
