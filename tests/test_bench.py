"""`flowpo bench`: the target arithmetic on hand-made metrics, and the real grid at a tiny budget."""
import csv
import json
import subprocess
import sys
import time

import pytest
from conftest import TINY

from flowpo import bench

# ----------------------------------------------------------------------------- hand-made metrics


def write_run(root, task, preset, seed, evals, train, iterations=4, peak_rss_mb=None):
    """A fake run folder: config.yaml (only train.iterations) and metrics.jsonl.

    evals: [(step, eval_reward_mean, wall_s, nfe)]; train: [(step, reward_mean, iteration_s, nfe_per_image)].
    """
    d = root / "runs" / task / preset / f"seed{seed}"
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(f"train:\n  iterations: {iterations}\n")
    lines = [{"step": s, "eval_reward_mean": r, "wall_s": w, "nfe": n} for s, r, w, n in evals]
    lines += [{"step": s, "reward_mean": r, "reward_std": 0.1, "nfe": 0, "nfe_per_image": npi, "wall_s": 0.0,
               "time/iteration_s": t} for s, r, t, npi in train]
    lines.sort(key=lambda x: (x["step"], "reward_mean" in x))
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if peak_rss_mb is not None:
        log = root / "logs" / task / preset
        log.mkdir(parents=True, exist_ok=True)
        (log / f"seed{seed}.json").write_text(json.dumps({"peak_rss_mb": peak_rss_mb, "returncode": 0}))


TRAIN = [(0, 0.5, 1.0, 10.0), (1, 0.6, 2.0, 10.0), (2, 0.7, 3.0, 12.0), (3, 0.8, 2.0, 12.0)]


def test_target_and_steps_to_target_on_synthetic_runs(tmp_path):
    write_run(tmp_path, "alignment", "flow_grpo", 0,
              [(0, 0.50, 0.1, 0), (2, 0.60, 2.0, 100), (4, 0.70, 4.0, 200)], TRAIN, peak_rss_mb=300.0)
    write_run(tmp_path, "alignment", "flow_grpo", 1,
              [(0, 0.50, 0.1, 0), (2, 0.80, 2.5, 100), (4, 0.90, 4.5, 200)], TRAIN)
    write_run(tmp_path, "alignment", "mix_grpo", 0,
              [(0, 0.50, 0.1, 0), (2, 0.85, 1.5, 60), (4, 0.82, 3.0, 120)], TRAIN)
    write_run(tmp_path, "alignment", "op_grpo", 0,  # killed after iteration 2: unfinished
              [(0, 0.50, 0.1, 0), (2, 0.79, 2.0, 100)], TRAIN[:2])
    jobs = bench.discover(tmp_path)
    assert len(jobs) == 4
    rows, _ = bench.collect(tmp_path, jobs, None)
    r = {(x["preset"], x["seed"]): x for x in rows}

    # target = mean of flow_grpo's final (step 4) evals = (0.70 + 0.90) / 2 = 0.80
    assert all(x["target"] == pytest.approx(0.80) for x in rows)
    # seed 0 peaks at 0.70 < 0.80: never reaches it
    assert r["flow_grpo", 0]["steps_to_target"] is None and r["flow_grpo", 0]["wall_s_to_target"] is None
    # seed 1 reaches exactly 0.80 at step 2 (≥ counts), at wall_s 2.5 and nfe 100
    assert (r["flow_grpo", 1]["steps_to_target"], r["flow_grpo", 1]["wall_s_to_target"],
            r["flow_grpo", 1]["nfe_to_target"]) == (2, 2.5, 100)
    # mix_grpo: 0.85 ≥ 0.80 first at step 2 (wall 1.5, nfe 60), although it ends at 0.82
    assert (r["mix_grpo", 0]["steps_to_target"], r["mix_grpo", 0]["wall_s_to_target"],
            r["mix_grpo", 0]["nfe_to_target"]) == (2, 1.5, 60)
    assert r["mix_grpo", 0]["final_eval_reward"] == 0.82 and r["mix_grpo", 0]["base_eval_reward"] == 0.50
    # op_grpo: 0.79 < 0.80 and no final eval line
    assert r["op_grpo", 0]["status"] == "unfinished" and r["op_grpo", 0]["final_eval_reward"] is None
    assert r["op_grpo", 0]["steps_to_target"] is None
    # per-iteration means over the training lines: (1 + 2 + 3 + 2) / 4 = 2.0 s, (10 + 10 + 12 + 12) / 4 = 11 NFE
    assert r["flow_grpo", 0]["s_per_iteration"] == pytest.approx(2.0)
    assert r["flow_grpo", 0]["nfe_per_image"] == pytest.approx(11.0)
    assert r["flow_grpo", 0]["final_train_reward"] == 0.8  # the step-3 training line
    assert r["flow_grpo", 0]["peak_rss_mb"] == 300.0 and r["flow_grpo", 1]["peak_rss_mb"] is None

    s = {x["preset"]: x for x in bench.summarize(rows)}
    # flow_grpo: 1 of 2 seeds reaches; mean steps over the reaching seeds = 2 → 2 / 4 of the budget
    assert s["flow_grpo"]["reached_fraction"] == 0.5
    assert s["flow_grpo"]["steps_to_target_fraction_of_budget"] == pytest.approx(0.5)
    # final eval over seeds: mean (0.7 + 0.9) / 2 = 0.8, sample std |0.9 − 0.7| / √2 ≈ 0.1414
    assert s["flow_grpo"]["final_eval_reward_mean"] == pytest.approx(0.8)
    assert s["flow_grpo"]["final_eval_reward_std"] == pytest.approx(0.2 / 2 ** 0.5)
    assert s["mix_grpo"]["reached_fraction"] == 1.0 and s["op_grpo"]["finished"] == 0


def test_first_reach_tolerates_mean_round_off():
    # three seeds ending at 0.1, 0.2, 0.3: fmean is 0.2 up to round-off; the 0.2 run must reach it
    target = (0.1 + 0.2 + 0.3) / 3  # 0.20000000000000004 > 0.2 in floats
    assert bench.first_reach([{"step": 3, "eval_reward_mean": 0.2}], target)["step"] == 3
    assert bench.first_reach([{"step": 3, "eval_reward_mean": 0.19}], target) is None
    assert bench.first_reach([{"step": 3, "eval_reward_mean": 0.5}], None) is None


# ----------------------------------------------------------------------------- the real command


def bench_cli(*args, timeout=240):
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "flowpo", "bench", *args], capture_output=True, text=True,
                       timeout=timeout)
    return p, time.time() - t0


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_bench_two_presets_tiny(tmp_path):
    out = tmp_path / "bench"
    sets = [x for ov in TINY if not ov.startswith(("train.iterations=", "log.")) for x in ("--set", ov)]
    args = ["--out", str(out), "--presets", "dance_grpo,flow_grpo", "--seeds", "0", "--tasks", "alignment",
            "--iterations", "2", "--jobs", "2", *sets]
    p, first_s = bench_cli(*args)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "[2/2]" in p.stdout and not (out / "failures.txt").exists()

    rows = read_csv(out / "results.csv")
    for col in ("task", "preset", "seed", "iterations", "final_eval_reward", "steps_to_target", "wall_s_to_target",
                "s_per_iteration", "nfe_per_image", "peak_rss_mb", "base_eval_reward", "final_train_reward",
                "nfe_to_target"):
        assert col in rows[0], col
    assert sorted((r["task"], r["preset"], r["seed"]) for r in rows) == [
        ("alignment", "dance_grpo", "0"), ("alignment", "flow_grpo", "0")]
    ref = next(r for r in rows if r["preset"] == "flow_grpo")
    # one seed: the target is flow_grpo's own final eval, which it reaches by the last eval at the latest
    assert float(ref["target"]) == float(ref["final_eval_reward"])
    assert ref["steps_to_target"] != "" and 0 <= int(ref["steps_to_target"]) <= 2
    for r in rows:
        assert r["status"] == "ok" and r["iterations"] == "2"
        assert float(r["s_per_iteration"]) > 0 and float(r["nfe_per_image"]) > 0 and float(r["peak_rss_mb"]) > 50
    for name in ("summary.csv", "summary.md", "plots/alignment_vs_iterations.png", "plots/alignment_vs_wall.png",
                 "plots/alignment_vs_nfe.png"):
        assert (out / name).stat().st_size > 0, name
    assert "| flow_grpo |" in (out / "summary.md").read_text()

    # the same command again: both runs are finished, nothing is launched
    p, second_s = bench_cli(*args)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "2 already finished, 0 to run" in p.stdout
    assert second_s < first_s / 2

    # report-only rebuilds the same results from the run folders (in-process: no training)
    before = (out / "results.csv").read_text()
    (out / "results.csv").unlink()
    (out / "plots" / "alignment_vs_nfe.png").unlink()
    assert bench.main(["--out", str(out), "--report-only"]) == 0
    assert (out / "results.csv").read_text() == before
    assert (out / "plots" / "alignment_vs_nfe.png").exists()


@pytest.mark.slow
def test_bench_resumes_extends_and_restarts(tmp_path):
    out = tmp_path / "bench"
    sets = [x for ov in TINY if not ov.startswith(("train.iterations=", "log.")) for x in ("--set", ov)]
    common = ["--out", str(out), "--presets", "flow_grpo", "--tasks", "alignment", "--jobs", "2", *sets]
    p, _ = bench_cli(*common, "--seeds", "0", "--iterations", "2")
    assert p.returncode == 0, p.stderr[-2000:]
    # seed 1 was started but killed before its first checkpoint: the bench restarts it from scratch
    stale = out / "runs" / "alignment" / "flow_grpo" / "seed1"
    stale.mkdir(parents=True)
    (stale / "config.yaml").write_text("train:\n  iterations: 3\n")
    (stale / "metrics.jsonl").write_text('{"step": 0, "eval_reward_mean": 0.5, "wall_s": 0.1, "nfe": 0}\n')
    dry, _ = bench_cli(*common, "--seeds", "0,1", "--iterations", "3", "--dry-run")
    assert "--resume" in dry.stdout and "rm -rf" in dry.stdout
    # a larger budget continues seed 0 from its final checkpoint instead of starting over
    p, _ = bench_cli(*common, "--seeds", "0,1", "--iterations", "3")
    assert p.returncode == 0, p.stderr[-2000:]
    seed0 = [json.loads(x) for x in (out / "runs/alignment/flow_grpo/seed0/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in seed0 if "reward_mean" in r] == [0, 1, 2]
    rows = read_csv(out / "results.csv")
    assert [(r["seed"], r["status"], r["iterations"]) for r in rows] == [("0", "ok", "3"), ("1", "ok", "3")]
    # a smaller budget than the runs already have is refused
    p, _ = bench_cli(*common, "--seeds", "0", "--iterations", "1")
    assert p.returncode == 2 and "already trained longer" in p.stderr


def test_bench_dry_run_without_seeds_uses_the_default_seeds(tmp_path):
    # the README's `flowpo bench --out DIR` leaves --seeds out (it crashed before the default was set)
    p, _ = bench_cli("--out", str(tmp_path / "b"), "--presets", "flow_grpo", "--tasks", "alignment", "--dry-run")
    assert p.returncode == 0, p.stderr[-2000:]
    assert all(f"seed{s}" in p.stdout for s in (0, 1, 2)), p.stdout


def test_extending_a_decaying_schedule_restarts_the_run(tmp_path):
    from flowpo.bench.runner import _schedule_bound

    d = tmp_path / "r"
    d.mkdir()
    (d / "config.yaml").write_text("train:\n  iterations: 40\n  lr_schedule: cosine\n  lr_horizon: 40\n")
    assert _schedule_bound(d, 60) and not _schedule_bound(d, 40)
    (d / "config.yaml").write_text("train:\n  iterations: 40\n  lr_schedule: constant\n  lr_horizon: 40\n")
    assert not _schedule_bound(d, 60)
