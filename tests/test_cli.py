"""End-to-end CLI on the embedded default with a tiny budget."""
import json
import subprocess
import sys

from conftest import TINY


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "flowpo", *args], capture_output=True, text=True, timeout=timeout)


def test_train_eval_sample_resume(tmp_path):
    out = tmp_path / "run"
    p = run("train", "--preset", "flow_grpo", "--out", str(out), *TINY)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "final eval_reward_mean=" in p.stdout
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum("reward_mean" in r for r in rows) == 2
    p = run("eval", "--run", str(out))
    assert p.returncode == 0, p.stderr[-2000:]
    rec = json.loads(p.stdout.strip().splitlines()[-1])
    assert 0.0 <= rec["eval_reward_mean"] <= 1.0 and rec["step"] == 2
    p = run("sample", "--run", str(out), "--prompt", "a handwritten 5", "--n", "4", "--out", str(tmp_path / "s.png"))
    assert p.returncode == 0 and (tmp_path / "s.png").stat().st_size > 0
    # continue the same run for one more iteration
    p = run("train", "--resume", str(out), "train.iterations=3")
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward_mean" in r] == [0, 1, 2]


def test_presets_lists_every_seed_method():
    p = run("presets")
    for name in ("flow_grpo", "dance_grpo", "mix_grpo", "mix_grpo_flash", "mix_grpo_flash_star", "op_grpo",
                 "stepwise_grpo"):
        assert name in p.stdout


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    p = run("train", "--resume", str(tmp_path))
    assert p.returncode == 2 and "no config.yaml" in p.stderr and "Traceback" not in p.stderr
