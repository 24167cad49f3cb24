"""Fuzz: random config overrides and corrupted YAML / JSON / safetensors inputs each end with exit
code 2 (one line) or a clean run, never a traceback, and never modify a checkpoint."""
import hashlib
import random

import pytest

from conftest import TINY
from flowpo import config
from flowpo.cli import main

VALUES = ["-1", "0", "1", "2", "0.5", "1e9", "-1e9", "1e-30", "nan", "inf", "-inf", "abc", "", "null", "true",
          "false", "[1, 2]", "[]", "[abc]", "{a: 1}", "[", "]", "'", "3.7", "100000", "ode", "sliding_window",
          "dpm2m", "stepwise", "awm", "embedded", "sd3", "  ", "1,2", "é", "0x10", "1_000"]


def _run(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out + out.err


def _keys():
    return [k for k, *_ in config.describe(config.Config())]


def test_random_overrides_are_accepted_or_one_line(capsys):
    rng = random.Random(0)
    keys = _keys()
    seen = {0: 0, 2: 0}
    for _ in range(300):
        over = [f"{rng.choice(keys)}={rng.choice(VALUES)}" for _ in range(rng.choice([1, 1, 2, 3]))]
        code, text = _run(capsys, "config", *over)
        assert code in (0, 2) and "Traceback" not in text, (over, text[-500:])
        if code == 2:
            assert len([ln for ln in text.splitlines() if ln.startswith("flowpo: error:")]) == 1, (over, text)
        seen[code] += 1
    assert seen[0] > 20 and seen[2] > 100, seen  # both outcomes are exercised


def test_accepted_random_overrides_train_or_fail_in_one_line(tmp_path, capsys):
    rng = random.Random(1)
    keys = [k for k in _keys() if not k.startswith(("model.", "log.", "train.threads", "sample.prompts_file",
                                                     "eval.prompts_file", "reward.names", "sample.sigmas"))]
    ran = 0
    for i in range(400):
        over = [f"{rng.choice(keys)}={rng.choice(VALUES)}"]
        code, _ = _run(capsys, "config", *over)
        if code != 0:
            continue
        code, text = _run(capsys, "train", "--out", tmp_path / f"r{i}", *TINY, "train.iterations=1", "eval.every=0",
                          *over)
        assert "Traceback" not in text, (over, text[-800:])
        assert code == 0 or len([ln for ln in text.splitlines() if ln.startswith("flowpo: error:")]) == 1, (over, text)
        ran += 1
        if ran == 8:
            break
    assert ran == 8


@pytest.mark.parametrize("payload", [b"", b"\x00\xff\xfe garbage", b"train: [", b"- a\n- b\n", b"train:\n  lr: abc\n",
                                     b"\xef\xbb\xbftrain: {iterations: 2}\n", b"{{{{", b"train:\n  nope: 1\n"])
def test_corrupt_yaml_config_files(tmp_path, capsys, payload):
    f = tmp_path / "c.yaml"
    f.write_bytes(payload)
    code, text = _run(capsys, "config", "--config", f)
    assert code in (0, 2) and "Traceback" not in text, text


def _hashes(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_corrupted_run_folders_never_traceback_nor_change_a_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    code, text = _run(capsys, "train", "--out", out, *TINY)
    assert code == 0, text
    rng = random.Random(2)
    files = sorted(p for p in (out / "checkpoints").rglob("*") if p.is_file()) + [out / "config.yaml"]
    pristine = {p: p.read_bytes() for p in files}
    metrics = (out / "metrics.jsonl").read_text()
    for trial in range(12):
        victims = rng.sample(files, rng.choice([1, 2, len(files)]))
        for v in victims:
            data = pristine[v]
            how = rng.choice(["truncate", "garbage", "flip", "empty"])
            if how == "truncate":
                v.write_bytes(data[: rng.randrange(max(1, len(data)))])
            elif how == "garbage":
                v.write_bytes(bytes(rng.randrange(256) for _ in range(64)))
            elif how == "flip" and data:
                i = rng.randrange(len(data))
                v.write_bytes(data[:i] + bytes([data[i] ^ 0x55]) + data[i + 1:])
            else:
                v.write_bytes(b"")
        before = _hashes(out / "checkpoints")
        code, text = _run(capsys, "train", "--resume", out)
        assert code in (0, 2) and "Traceback" not in text, (trial, text[-800:])
        after = _hashes(out / "checkpoints")
        for rel, h in before.items():  # each file is as it was, or kept aside in a .damaged folder
            folder, _, name = rel.partition("/")
            assert after.get(rel) == h or after.get(f"{folder}.damaged/{name}") == h or \
                (code == 0 and rel not in after and f"{folder}.damaged/{name}" not in after
                 and folder not in {r.partition("/")[0] for r in after}), (trial, rel)
        import shutil

        shutil.rmtree(out / "checkpoints")  # repair for the next trial
        for p, data in pristine.items():
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        (out / "metrics.jsonl").write_text(metrics)


REWARD_KEYS = ["batch_size", "frames", "device", "dtype", "path", "processor_path", "scaling", "url", "reward",
               "timeout_s", "retries", "pattern", "template", "on_unreadable", "model", "nope", "head", "threads"]


def test_random_reward_options_run_or_fail_in_one_line(tmp_path, capsys):
    """reward.options.<name>.<key>=<value> at random, for embedded, model and service scorers (no
    service runs, no model folder exists): a clean run or one line, never a traceback."""
    rng = random.Random(3)
    names = ["digit_alignment", "stroke_quality", "pickscore", "hpsv2", "imagereward", "aesthetic", "clipscore",
             "remote", "vlm_judge", "remote@a"]
    seen = {0: 0, 1: 0, 2: 0}
    for i in range(60):
        name = rng.choice(names)
        if i % 3 == 0:  # the embedded scorers' own options, with values that are often right
            name = rng.choice(names[:2])
            opts = [f"reward.options.{name}.{rng.choice(['batch_size', 'frames'])}="
                    f"{rng.choice(['1', '3', '0', 'first', 'mean', *VALUES[:6]])}"]
        else:
            opts = [f"reward.options.{name}.{rng.choice(REWARD_KEYS)}={rng.choice(VALUES)}"
                    for _ in range(rng.choice([1, 2]))]
        code, text = _run(capsys, "train", "--out", tmp_path / f"r{i}", *TINY, "train.iterations=1", "eval.every=0",
                          "log.grids=false", f"reward.names=[{name}]", *opts)
        assert "Traceback" not in text, (name, opts, text[-800:])
        assert code in (0, 1, 2), (name, opts, text[-800:])
        if code:
            assert len([ln for ln in text.splitlines() if ln.startswith("flowpo: error:")]) == 1, (name, opts, text)
            assert "unexpected failure" not in text, (name, opts, text[-800:])
        seen[code] += 1
    assert seen[0] >= 3 and seen[2] >= 20, seen  # runs and refusals both exercised
