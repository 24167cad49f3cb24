"""`flowpo tune` and the race statistics (issue 29): the choice on tuning seeds by the area under the
eval curve, held-out seeds apart, bootstrap intervals with never-reaching runs censored at the budget."""
import math
import subprocess
import sys

import pytest
from conftest import TINY
from test_bench import write_run

from flowpo.bench import collect, discover
from flowpo.bench.stats import bootstrap_ci, race
from flowpo.bench.tune import auc, main as tune_main, parse_grid, points

TR = [(0, 0.5, 1.0, 10.0), (1, 0.6, 1.0, 10.0), (2, 0.7, 1.0, 10.0), (3, 0.8, 1.0, 10.0)]


def test_auc_is_the_mean_eval_reward_over_the_budget():
    ev = [{"step": 0, "eval_reward_mean": 0.0}, {"step": 2, "eval_reward_mean": 1.0},
          {"step": 4, "eval_reward_mean": 1.0}]
    assert auc(ev, 4) == pytest.approx((0.5 * 2 + 1.0 * 2) / 4)
    assert auc(ev[:2], 4) == -math.inf  # did not reach the budget
    assert auc(ev[:2] + [{"step": 4, "eval_reward_mean": float("nan")}], 4) == -math.inf


def test_grid_parsing_and_points():
    g = parse_grid(["train.lr=3e-4,1e-3", "awm:objective.ref_beta=0.001,0.003"], ["flow_grpo", "awm"])
    assert points(g["flow_grpo"]) == [["train.lr=3e-4"], ["train.lr=1e-3"]]
    assert len(points(g["awm"])) == 4 and ["train.lr=1e-3", "objective.ref_beta=0.003"] in points(g["awm"])
    with pytest.raises(ValueError, match="not in --presets"):
        parse_grid(["dance_grpo:train.lr=1"], ["flow_grpo"])
    with pytest.raises(ValueError, match="KEY=v1,v2"):
        parse_grid(["train.lr"], ["flow_grpo"])


def test_bootstrap_interval_contains_the_mean_and_narrows_with_agreement():
    lo, hi = bootstrap_ci([10.0, 20.0, 30.0, 40.0, 50.0])
    assert lo < 30.0 < hi and 10.0 <= lo and hi <= 50.0
    assert bootstrap_ci([5.0] * 5) == (5.0, 5.0) and bootstrap_ci([7.0]) == (7.0, 7.0) and bootstrap_ci([]) is None
    wide = bootstrap_ci([0.0, 100.0, 0.0, 100.0, 50.0])
    assert wide[1] - wide[0] > hi - lo
    assert bootstrap_ci([1.0, 2.0, 3.0]) == bootstrap_ci([1.0, 2.0, 3.0])  # a fixed generator


def test_race_counts_never_reaching_runs_censored_at_the_budget(tmp_path):
    for seed, final in ((0, 0.70), (1, 0.90)):  # target = 0.80
        write_run(tmp_path, "alignment", "flow_grpo", seed, [(0, 0.5, 0.1, 0), (2, 0.6 + 0.1 * seed, 2.0, 1),
                                                             (4, final, 4.0 + seed, 2)], TR)
    write_run(tmp_path, "alignment", "awm", 0, [(0, 0.5, 0.1, 0), (2, 0.85, 1.5, 1), (4, 0.9, 3.0, 2)], TR)
    write_run(tmp_path, "alignment", "awm", 1, [(0, 0.5, 0.1, 0), (2, 0.6, 1.0, 1), (4, 0.7, 9.0, 2)], TR)
    write_run(tmp_path, "alignment", "awm", 2, [(0, 0.5, 0.1, 0), (2, 0.6, 1.0, 1)], TR[:2])  # unfinished
    rows, _ = collect(tmp_path, discover(tmp_path), None)
    wall_total = {(r["preset"], r["seed"]): r["wall_s_total"] for r in rows}
    t = {s["preset"]: s for s in race(rows)}
    a = t["awm"]
    assert (a["seeds"], a["reached"], a["censored"], a["unfinished"]) == (2, 1, 1, 1)
    assert a["reached_share"] == 0.5
    assert a["iters_to_target_mean"] == pytest.approx((2 + 4) / 2)  # the censored run counts 4, the budget
    assert a["wall_s_to_target_mean"] == pytest.approx((1.5 + wall_total["awm", 1]) / 2)
    assert a["iters_to_target_lo"] == 2 and a["iters_to_target_hi"] == 4
    f = t["flow_grpo"]
    assert (f["reached"], f["censored"]) == (1, 1) and f["iters_to_target_mean"] == pytest.approx((4 + 4) / 2)


def _fake_tuning(out, lr, seed, curve):
    write_run(out / "tune" / f"lr={lr}", "alignment", "flow_grpo", seed, curve, TR)


def test_choice_uses_only_the_tuning_seeds_and_the_race_reports_the_tuned_point(tmp_path, capsys):
    out = tmp_path / "t"
    good = [(0, 0.5, 0.1, 0), (2, 0.8, 1.0, 1), (4, 0.8, 2.0, 2)]
    late = [(0, 0.5, 0.1, 0), (2, 0.5, 1.0, 1), (4, 0.9, 2.0, 2)]  # higher final, smaller area
    for s in (7, 8):
        _fake_tuning(out, "3e-4", s, late)
        _fake_tuning(out, "1e-3", s, good)
    for s in range(5):  # held-out runs as the runner would leave them at the chosen point
        write_run(out / "heldout", "alignment", "flow_grpo", s, good, TR)
        d = out / "heldout" / "runs" / "alignment" / "flow_grpo" / f"seed{s}"
        d.joinpath("config.yaml").write_text("train:\n  iterations: 4\n  lr: 0.001\n")
    args = ["--out", str(out), "--presets", "flow_grpo", "--tasks", "alignment", "--iterations", "4",
            "--grid", "train.lr=3e-4,1e-3", "--tune-seeds", "7,8", "--seeds", "0,1,2,3,4", "--report-only"]
    assert tune_main(args) == 0
    choice = (out / "choice.md").read_text()
    assert "| alignment | flow_grpo | train.lr=1e-3 | 0.7250 |" in choice and "**yes**" in choice
    assert choice.count("**yes**") == 1
    race_md = (out / "heldout" / "race.md").read_text()
    assert "| flow_grpo | lr=1e-3 | 5 | 5/5 |" in race_md
    # a held-out run made at another point than the choice is refused, not mixed in
    (out / "heldout" / "runs" / "alignment" / "flow_grpo" / "seed0" / "config.yaml").write_text(
        "train:\n  iterations: 4\n  lr: 0.0003\n")
    with pytest.raises(SystemExit):
        tune_main(args)
    assert "but the choice is train.lr=1e-3" in capsys.readouterr().err


def test_held_out_seeds_must_not_be_tuning_seeds(capsys):
    with pytest.raises(SystemExit):
        tune_main(["--tune-seeds", "1,2", "--seeds", "2,3,4,5,6", "--dry-run"])
    assert "must play no part in the choice" in capsys.readouterr().err


@pytest.mark.slow
def test_tune_end_to_end_tiny_and_resumes(tmp_path):
    out = tmp_path / "tune"
    sets = [x for ov in TINY if not ov.startswith(("train.iterations=", "log.")) for x in ("--set", ov)]
    args = [sys.executable, "-m", "flowpo", "tune", "--out", str(out), "--presets", "flow_grpo", "--tasks",
            "alignment", "--iterations", "1", "--grid", "train.lr=1e-3,3e-3", "--tune-seeds", "9", "--seeds", "0,1",
            "--jobs", "2", *sets]
    p = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert (out / "choice.md").exists() and (out / "heldout" / "race.md").exists()
    assert (out / "tune" / "lr=1e-3" / "runs" / "alignment" / "flow_grpo" / "seed9" / "metrics.jsonl").exists()
    assert sorted(d.name for d in (out / "heldout" / "runs" / "alignment" / "flow_grpo").iterdir()) == ["seed0",
                                                                                                      "seed1"]
    p = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.count("0 to run") == 3  # two grid points and the held-out runs


def test_heavy_task_reward_is_alignment_times_a_one_sided_stroke_penalty():
    import torch

    from flowpo.bench import TASKS
    from flowpo.embedded.rewards import digit_alignment, digit_heavy

    torch.manual_seed(0)
    x = torch.rand(6, 1, 16, 16)
    x[:3] = (x[:3] > 0.45).float()       # ink ≈ 0.55: bold enough, the penalty is 1
    x[3:] = (x[3:] > 0.75).float()       # ink ≈ 0.25: thin, 0.17 short of 0.42
    prompts = ["a handwritten 3"] * 6
    r, p = digit_heavy(x, prompts), digit_alignment(x, prompts)
    ink = x.mean((1, 2, 3))
    want = p * torch.exp(-(0.42 - ink).clamp(min=0) ** 2 / (2 * 0.03 ** 2))
    assert torch.allclose(r, want, atol=1e-6)
    assert torch.allclose(r[:3], p[:3]) and (r[3:] < 0.01 * p[3:] + 1e-9).all()
    assert "reward.names=[digit_heavy]" in TASKS["heavy"].overrides


def test_ablation_reader_counts_a_run_that_never_reaches_the_target(tmp_path, capsys, monkeypatch):
    """benchmarks/ablation_to_target.py reads hand-run ablations as the race reads its runs: the
    first evaluation at or above the target, the last evaluated step for a run that never reaches it."""
    import importlib.util
    import json
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(
        "ablation_to_target", Path(__file__).resolve().parent.parent / "benchmarks" / "ablation_to_target.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    curves = {0: [0.2, 0.5, 0.9, 0.95], 1: [0.2, 0.4, 0.6, 0.7]}  # seed 1 never reaches 0.8
    for seed, values in curves.items():
        d = tmp_path / "abl" / f"seed{seed}"
        d.mkdir(parents=True)
        rows = [{"eval_reward_mean": v, "eval/a": v / 2, "step": 5 * i} for i, v in enumerate(values)]
        rows.insert(1, {"loss/policy": 0.1, "step": 1})  # training lines are skipped
        (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    monkeypatch.setattr(sys, "argv", ["x", str(tmp_path / "abl"), "--target", "0.8", "--parts", "5,15"])
    mod.main()
    out = capsys.readouterr().out.splitlines()
    assert "| 1/2 | 12.5 [10.0, 15.0] | 10 / 15 | 0.825 |" in out[-2]
    assert out[-1].endswith("eval/a at steps 5: 0.225, 15: 0.412")  # (0.5 + 0.4) / 4, (0.95 + 0.7) / 4
    monkeypatch.setattr(sys, "argv", ["x", str(tmp_path), "--target", "0.8"])
    with pytest.raises(SystemExit, match="no seed"):
        mod.main()
