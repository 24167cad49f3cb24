"""Fuzz: random config overrides and corrupted YAML / JSON / safetensors inputs each end with exit
code 2 (one line) or a clean run, never a traceback, and never modify a checkpoint."""
import hashlib
import os
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
    # both outcomes are exercised (about 6–9% of random draws are accepted, depending on the key list)
    assert seen[0] > 10 and seen[2] > 100, seen


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


# ----------------------------------------------------------------------------- every key, every verb
BOMB = "".join(f"{c}: &{c} [" + ",".join([f"*{p}" if p else '"lol"'] * 9) + "]\n"
               for c, p in zip("abcdefgh", ["", *"abcdefg"]))  # 9**8 "lol"s from ~250 bytes
HOSTILE = ["-1", "0", "1e30", "123456789012345678901234567890", "nan", "-inf", "abc", "[1, 2]", "[]", "{a: 1}",
           "&a [*a]", BOMB, "x" * 20000, "1" * 5000]
STDERR_LIMIT = 1500  # one bounded line (plus argparse's usage line where argparse answers)


def _numeric(typ: str) -> bool:
    return ("int" in typ or "float" in typ) and "list" not in typ and "tuple" not in typ


def _check_one_line(code, text, where):
    assert "Traceback" not in text and "unexpected failure" not in text, (where, text[-800:])
    if code == 2:
        errs = [ln for ln in text.splitlines() if ln.startswith("flowpo: error:")]
        assert len(errs) == 1 and len(errs[0]) <= STDERR_LIMIT, (where, text[:800])
        return errs[0]
    return ""


def test_every_config_key_refuses_hostile_values_by_name(capsys):
    """Every key of `flowpo config` (and a reward option) with −1, 0, huge, NaN, strings, lists, a
    recursive alias, an alias bomb and huge strings: a clean load or one short line naming the key;
    every numeric key refuses −1, NaN and strings. In-process (config.load, then the CLI's own
    error path for each refusal), so ~1600 cases take seconds."""
    from flowpo.cli import explain

    rows = [(k, typ) for k, typ, *_ in config.describe(config.Config())]
    rows.append(("reward.options.digit_alignment.batch_size", "any"))
    for key, typ in rows:
        for value in HOSTILE:
            try:
                config.load(None, None, [f"{key}={value}"])
                ok = True
            except config.ConfigError as e:
                ok = False
                code, line = explain(e)
                assert code == 2 and len(line) <= STDERR_LIMIT, (key, value[:40], line[:300])
                assert key.split(".")[0] in line, (key, value[:40], line)  # the key (or its section) is named
            if _numeric(typ) and value in ("-1", "nan", "-inf", "abc", "[1, 2]", "{a: 1}", BOMB, "x" * 20000):
                assert not ok, f"{key}={value[:40]} was accepted"
            if value == "123456789012345678901234567890" and "int" in typ and "list" not in typ:
                assert not ok, f"{key}={value} was accepted"
    # through the CLI: a sample of the same cases end as one bounded line, exit 2
    for i, (key, typ) in enumerate(rows):
        value = HOSTILE[i % len(HOSTILE)]
        code, text = _run(capsys, "config", f"{key}={value}")
        assert code in (0, 2), (key, value[:40], text[-500:])
        line = _check_one_line(code, text, (key, value[:40]))
        if code == 2:
            assert len(text) <= STDERR_LIMIT + 200 and key.split(".")[0] in line, (key, value[:40], text[:500])


def test_alias_bomb_and_exact_seeds(tmp_path, capsys):
    f = tmp_path / "bomb.yaml"
    f.write_text(BOMB + "model: {path: *h}\n")
    code, text = _run(capsys, "config", "--config", f)
    assert code == 2 and len(text) < 500 and "aliases" in _check_one_line(code, text, "bomb"), text[:500]
    f.write_text("train: &t {iterations: 3}\neval: {every: 1}\nlog: {grids: false}\n")  # a small anchor is fine
    assert config.load(str(f)).train.iterations == 3
    assert config.load(None, None, ["train.seed=12345678901234567"]).train.seed == 12345678901234567
    for bad, words in [("train.seed=1e23", "train.seed="), ("train.seed=-1", "train.seed=-1 is out of range"),
                       ("train.threads=1e9", "train.threads=1000000000 is out of range"),
                       ("train.adam_eps=-1", "train.adam_eps=-1.0"), ("train.betas=[0.9,1.5]", "train.betas[1]=1.5"),
                       ("train.weight_decay=-5", "train.weight_decay=-5.0"), ("eval.guidance=-1", "eval.guidance"),
                       ("model.lora_alpha=-1", "model.lora_alpha"), ("model.resolution=-1", "model.resolution"),
                       ("train.lr_final=-1", "train.lr_final")]:
        with pytest.raises(config.ConfigError, match=words.replace("[", r"\[")):
            config.load(None, None, [bad])


def _run_any(capsys, *args):
    """main(args) → (code, stdout+stderr); argparse's own refusals (SystemExit 2) included."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("verbs") / "run"
    assert main(["train", "--out", str(out), *TINY, "train.iterations=1", "eval.every=0"]) == 0
    return out


def test_every_verbs_options_refuse_bad_values_in_one_line(tmp_path, capsys, tiny_run, monkeypatch):
    """Each option of each verb with a bad value: exit 2, no traceback, a bounded message naming the
    option (argparse's refusals name it too)."""
    from flowpo.embedded import pretrain
    from flowpo.training import trainer

    def started(*a, **k):
        raise AssertionError("a bad option started a run")

    monkeypatch.setattr(trainer.Trainer, "__init__", started)
    monkeypatch.setattr(pretrain, "pretrain", started)
    monkeypatch.chdir(tmp_path)
    f = tmp_path / "a_file"
    f.write_text("x")
    d = tmp_path / "a_dir"
    d.mkdir()
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    huge = "y" * 10000
    run = tiny_run
    cases = [
        (["train", "--out", ""], "--out"), (["train", "--out", f], "--out"), (["train", "--out", f / "x"], "--out"),
        (["train", "--resume", ""], "--resume"), (["train", "--resume", d], "--resume"),
        (["train", "--resume", f], "--resume"), (["train", "--resume", run, "--out", d], "--out"),
        (["train", "--config", ""], "config"), (["train", "--config", d], "config"),
        (["train", "--config", fifo], "config"), (["train", "--config", tmp_path / "none.yaml"], "config"),
        (["train", "--preset", ""], "preset"), (["train", "--preset", huge], "preset"),
        (["train", "train.iterations"], "key.path=value"), (["train", f"{huge}=1"], "unknown config key"),
        (["eval", "--run", ""], "--run"), (["eval", "--run", d], "--run"), (["eval", "--run", f], "--run"),
        (["eval", "--run", run, "--records", d], "--records"), (["eval", "--run", run, "--records", ""], "--records"),
        (["sample", "--run", run, "--prompt", "a 3", "--n", "0"], "--n"),
        (["sample", "--run", run, "--prompt", "a 3", "--n", "-3"], "--n"),
        (["sample", "--run", run, "--prompt", "a 3", "--n", "abc"], "--n"),
        (["sample", "--run", run, "--prompt", "a 3", "--n", "100000000"], "--n"),
        (["sample", "--run", run, "--prompt", "a 3", "--seed", "-1"], "--seed"),
        (["sample", "--run", run, "--prompt", "a 3", "--seed", str(2 ** 64)], "--seed"),
        (["sample", "--run", run, "--prompt", "a 3", "--out", d], "--out"),
        (["sample", "--run", run, "--prompt", "a 3", "--out", ""], "--out"),
        (["sample", "--run", run, "--prompt", "a 3", "--out", tmp_path / "noext"], "--out"),
        (["sample", "--run", run, "--prompt", "a 3", "--out", f / "x.png"], "--out"),
        (["sample", "--run", run], "--prompt"),
        (["export", "--run", run, "--out", ""], "--out"), (["export", "--run", run, "--out", d], "--out"),
        (["export", "--run", run, "--out", f], "--out"), (["export", "--run", run, "--out", f / "m"], "--out"),
        (["export", "--run", d, "--out", tmp_path / "m"], "--run"), (["export", "--run", run], "--out"),
        (["config", "--preset", "nope"], "preset"), (["config", "--config", d], "config"),
        (["pretrain", "--seed", "-1"], "--seed"), (["pretrain", "--flow-steps", "0"], "--flow-steps"),
        (["pretrain", "--clf-steps", "-5"], "--clf-steps"), (["pretrain", "--threads", "0"], "--threads"),
        (["pretrain", "--threads", "1000000000"], "--threads"), (["pretrain", "--out", f], "--out"),
        (["pretrain", "--seed", "abc"], "--seed"),
        (["bench", "--jobs", "0"], "--jobs"), (["bench", "--iterations", "-1"], "--iterations"),
        (["bench", "--seeds", "a,b"], "--seeds"), (["bench", "--seeds", "-1"], "--seeds"),
        (["bench", "--out", f], "--out"), (["bench", "--set", "nokey"], "--set"),
        (["nope"], "invalid choice"), (["presets", "--x"], "unrecognized"),
    ]
    for args, words in cases:
        code, text = _run_any(capsys, *args)
        where = [str(a)[:40] for a in args]
        assert code == 2, (where, code, text[-600:])
        assert "Traceback" not in text and "unexpected failure" not in text, (where, text[-600:])
        assert len(text) <= 4000, (where, len(text))  # argparse adds its usage lines; nothing runs away
        assert words in text, (where, words, text[-600:])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_dir", "a_file", "fifo.yaml"]  # nothing written
