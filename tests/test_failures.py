"""Every failure is one line (exit 2: bad input, 1: a runtime failure), nothing is lost, and no run
folder is a dead end. In-process `flowpo.cli.main` on the embedded default with a tiny budget."""
import json
import shutil

import pytest

from conftest import TINY, cli, one_line
from flowpo.cli import main




@pytest.fixture
def scorers(tmp_path, monkeypatch):
    (tmp_path / "my_scorers.py").write_text(
        "import torch\n"
        "def boom(images, prompts):\n    raise RuntimeError('model weights not loaded')\n"
        "def nan(images, prompts):\n    return torch.full((len(prompts),), float('nan'))\n"
        "def short(images, prompts):\n    return torch.zeros(1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("override,code,words", [
    ("reward.names=[pickscor]", 2, "unknown reward 'pickscor' (did you mean 'pickscore'?)"),
    ("reward.names=[pickscore]", 2, "reward 'pickscore' needs option 'path': set reward.options.pickscore.path="),
    ("reward.names=[digit_alignment] reward.options.pickscore.path=/x", 2,
     "reward.options.pickscore is set but 'pickscore' is not in reward.names"),
    ("reward.names=[nope_module:score]", 2, "cannot import module 'nope_module'"),
    ("reward.names=[my_scorers:boom]", 1, "raised RuntimeError: model weights not loaded"),
    ("reward.names=[my_scorers:nan]", 1, "returned NaN/inf for 2 of 2 samples"),
    ("reward.names=[my_scorers:short]", 1, "returned 1 values for 2 samples"),
])
def test_reward_failures_are_one_line_before_anything_is_written(tmp_path, capsys, scorers, override, code, words):
    out = tmp_path / "run"
    got, _, err = cli(capsys, "train", "--out", out, *TINY, *override.split())
    assert got == code and words in one_line(err)
    assert not out.exists()  # the preflight scored a tiny batch before the run folder was made


def test_bad_input_files(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    cases = [
        ([f"sample.prompts_file={empty}"], "holds no prompts"),
        ([f"sample.prompts_file={tmp_path}"], "is a directory"),
    ]
    for overrides, words in cases:
        code, _, err = cli(capsys, "train", "--out", tmp_path / "r", *TINY, *overrides)
        assert code == 2 and words in one_line(err)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("train:\n  iterations: [1, 2\n")
    code, _, err = cli(capsys, "train", "--config", bad_yaml, "--out", tmp_path / "r")
    assert code == 2 and "is not valid YAML at line" in one_line(err)


@pytest.mark.parametrize("index,words", [("{not json", "is not valid JSON"), ('{"x": 1}', "has no _class_name")])
def test_a_damaged_diffusers_folder_is_one_line(tmp_path, capsys, index, words):
    folder = tmp_path / "pipe"
    folder.mkdir()
    (folder / "model_index.json").write_text(index)
    code, _, err = cli(capsys, "train", "--out", tmp_path / "r", *TINY, "model.kind=sd3", f"model.path={folder}")
    assert code == 2 and words in one_line(err)


def test_out_under_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    code, _, err = cli(capsys, "train", "--out", tmp_path / "f" / "run", *TINY)
    assert code == 2, err
    one_line(err)


def test_non_finite_gradient_is_one_line(tmp_path, capsys):
    code, _, err = cli(capsys, "train", "--out", tmp_path / "r", *TINY, "train.lr=1e30", "train.max_grad_norm=1e30",
                       "reward.names=[stroke_quality]")
    if code == 0:
        pytest.skip("this budget did not overflow the gradient")
    assert code == 1 and "non-finite gradient" in one_line(err)


def test_debug_env_gives_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWPO_DEBUG", "1")
    with pytest.raises(Exception, match="unknown reward"):
        main(["train", "--out", str(tmp_path / "r"), *TINY, "reward.names=[pickscor]"])


# ----------------------------------------------------------------------------- run folders
def _train(capsys, out, *extra):
    code, _, err = cli(capsys, "train", "--out", out, *TINY, *extra)
    assert code == 0, err
    return err


def test_a_run_killed_before_its_first_checkpoint_restarts_under_resume(tmp_path, capsys):
    out = tmp_path / "run"
    _train(capsys, out)
    shutil.rmtree(out / "checkpoints")  # as if killed before the first save
    code, _, err = cli(capsys, "train", "--out", out, *TINY)
    assert code == 2 and "--resume" in one_line(err)          # a fresh start refuses: it holds a run
    code, _, err = cli(capsys, "train", "--resume", out)
    assert code == 0 and "no intact checkpoint yet; starting the run afresh" in err
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
             if "reward_mean" in json.loads(x)]
    assert steps == [0, 1]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip", "state"])
def test_resume_skips_a_corrupt_newest_checkpoint(tmp_path, capsys, damage):
    out = tmp_path / "run"
    _train(capsys, out, "train.iterations=2", "train.keep_checkpoints=2")
    newest = out / "checkpoints" / "iter_000002"
    f = newest / ("state.json" if damage == "state" else "trainable.safetensors")
    data = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        f.write_bytes(b"\x00garbage" * 10)
    elif damage == "flip":  # one flipped byte inside the tensor data: same size, parses, wrong sum
        i = len(data) - 5
        f.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:])
    else:
        f.write_text("{not json")
    code, _, err = cli(capsys, "train", "--resume", out, "train.iterations=3")
    assert code == 0, err
    assert "skipping checkpoint iter_000002" in err and "continuing from iter_000001" in err
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
             if "reward_mean" in json.loads(x)]
    assert steps == [0, 1, 2]


def test_a_partial_last_metrics_line_is_dropped_on_resume(tmp_path, capsys):
    out = tmp_path / "run"
    _train(capsys, out)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "reward_me')  # what a full disk leaves
    code, _, err = cli(capsys, "train", "--resume", out, "train.iterations=3")
    assert code == 0 and "dropping a partial last line" in err
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(x) for x in lines)


def test_checkpoint_files_are_world_readable(tmp_path, capsys):
    out = tmp_path / "run"
    _train(capsys, out)
    modes = {f.name: f.stat().st_mode & 0o777 for f in (out / "checkpoints" / "iter_000002").iterdir()}
    assert modes and all(m == 0o644 for m in modes.values()), modes


def test_resume_refuses_changes_to_the_method_and_accepts_the_budget(tmp_path, capsys):
    out = tmp_path / "run"
    _train(capsys, out, "train.lr_schedule=cosine")
    for args, words in [(["sample.steps=6"], "--resume cannot change sample.steps (4 → 6)"),
                        (["sample.kernel=ddim"], "cannot change sample.kernel"),
                        (["--preset", "op_grpo"], "--preset cannot change it"),
                        (["train.iterations=1"], "below the 2 iterations this run has done")]:
        code, _, err = cli(capsys, "train", "--resume", out, *args)
        assert code == 2 and words in one_line(err), err
    # the same values a bench passes again are no change; a larger budget is applied and said
    code, _, err = cli(capsys, "train", "--resume", out, "train.iterations=4", "sample.steps=4", *TINY[2:3])
    assert code == 0 and "applying train.iterations=4" in err, err
    lrs = [json.loads(x)["train/lr"] for x in (out / "metrics.jsonl").read_text().splitlines()
           if "train/lr" in json.loads(x)]
    assert len(lrs) == 4 and lrs == sorted(lrs, reverse=True)   # the cosine does not rewind
    assert lrs[2] == lrs[3]                                     # past its horizon (2): lr_final·lr


def test_a_constant_reward_is_said(tmp_path, capsys, scorers):
    (scorers / "const_scorers.py").write_text("import torch\ndef one(images, prompts):\n"
                                             "    return torch.ones(len(prompts))\n")
    code, _, err = cli(capsys, "train", "--out", tmp_path / "r", *TINY, "reward.names=[const_scorers:one]")
    assert code == 0 and "every advantage is 0 (the reward is constant at 1)" in err
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["adv/all_zero"] for r in rows if "reward_mean" in r] == [1.0, 1.0]


def test_resume_may_move_a_rewards_files_but_not_change_what_it_computes(tmp_path, capsys, scorers):
    (scorers / "opt_scorers.py").write_text("import torch\ndef mean(images, prompts, scale=1.0, path=''):\n"
                                           "    return images.mean(dim=(1, 2, 3)) * scale\n")
    out = tmp_path / "run"
    _train(capsys, out, "reward.names=[opt_scorers:mean]", "reward.options.opt_scorers:mean.scale=2",
           "reward.options.opt_scorers:mean.path=/old")
    code, _, err = cli(capsys, "train", "--resume", out, "reward.options.opt_scorers:mean.scale=3")
    assert code == 2 and "cannot change reward.options.opt_scorers:mean.scale (2 → 3)" in one_line(err)
    code, _, err = cli(capsys, "train", "--resume", out, "train.iterations=3",
                       "reward.options.opt_scorers:mean.path=/new", "reward.options.opt_scorers:mean.batch_size=1")
    assert code == 0 and "reward.options.opt_scorers:mean.path='/new'" in err, err


def test_resume_with_an_option_at_its_default_is_no_change(tmp_path, capsys, scorers):
    (scorers / "def_scorers.py").write_text("import torch\ndef mean(images, prompts, scale=1.0):\n"
                                           "    return images.mean(dim=(1, 2, 3)) * scale\n")
    out = tmp_path / "run"
    _train(capsys, out, "reward.names=[def_scorers:mean]")
    code, _, err = cli(capsys, "train", "--resume", out, "train.iterations=3", "reward.options.def_scorers:mean.scale=1.0")
    assert code == 0 and "scale" not in err, err


def test_a_full_disk_during_a_save_is_one_line_and_the_run_resumes(tmp_path, capsys, monkeypatch):
    import errno

    from flowpo.training import checkpoint

    out = tmp_path / "run"
    real = checkpoint.save_file
    calls = {"n": 0}

    def full_disk(tensors, path, *a, **k):  # the second checkpoint's first file hits a full disk
        calls["n"] += 1
        if "iter_000002" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    code, _, err = cli(capsys, "train", "--out", out, *TINY)
    assert code == 1 and "no space left on the device" in one_line(err) and "--resume" in one_line(err)
    assert (out / "checkpoints" / "iter_000001").is_dir() and checkpoint.verify(out / "checkpoints" / "iter_000001") is None
    assert not (out / "checkpoints" / "iter_000002").exists()      # nothing half-written in its place
    monkeypatch.setattr(checkpoint, "save_file", real)             # space freed
    code, _, err = cli(capsys, "train", "--resume", out)
    assert code == 0, err
    assert checkpoint.verify(out / "checkpoints" / "iter_000002") is None


def test_tensorboard_does_not_log_resumed_steps_twice(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    tb = [a for a in TINY if not a.startswith("log.tensorboard")] + ["log.tensorboard=true",
                                                                       "train.checkpoint_every=2"]
    _train(capsys, out, *tb[:-1], "train.iterations=3", "train.checkpoint_every=2")
    # killed after iteration 3 was logged but before its checkpoint: the resume redoes iteration 3
    import shutil

    shutil.rmtree(out / "checkpoints" / "iter_000003", ignore_errors=True)
    code, _, err = cli(capsys, "train", "--resume", out, "train.iterations=4")
    assert code == 0, err
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("reward_mean")]
    assert steps == sorted(set(steps)) == [0, 1, 2, 3], steps


def test_eval_grids_carry_prompt_captions(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    out = tmp_path / "run"
    _train(capsys, out, "log.grids=true", "train.iterations=1")
    img = np.asarray(Image.open(out / "samples" / "eval_000001.png").convert("L"))
    tile = 16 * 4 + 4   # a 16 px digit upsampled ×4 and its padding
    strip = img[tile - 4: tile + 8]   # the caption band under the first row of tiles
    assert img.shape[0] > tile and (strip < 100).any()   # dark text on the white caption band


def test_grid_captions_keep_the_asked_digit_and_show_the_reward():
    from flowpo.embedded.prompts import HELDOUT_TEMPLATES, TRAIN_TEMPLATES
    from flowpo.training.runlog import CAPTION_LINES, _wrap

    def measure(s):  # the default font's 6 px per character
        return 6 * len(s)

    for t in HELDOUT_TEMPLATES + TRAIN_TEMPLATES:
        lines = _wrap(t.format(n="7", w="seven"), 64, measure, CAPTION_LINES)
        assert all(measure(ln) <= 64 for ln in lines) and len(lines) <= CAPTION_LINES, lines
        assert "7" in " ".join(lines) or "seven" in " ".join(lines), lines
    long = _wrap("a photo of " + "very " * 30 + "long prompt", 64, measure, CAPTION_LINES)
    assert long[0].startswith("a photo of") and long[-1].endswith("…")  # cut from the right


def test_eval_grids_show_each_tiles_reward(tmp_path):
    import numpy as np
    import torch
    from PIL import Image

    from flowpo.training.runlog import save_grid

    images = torch.zeros(2, 1, 16, 16)
    save_grid(images, tmp_path / "a.png", nrow=2, labels=["a 1", "a 2"])
    save_grid(images, tmp_path / "b.png", nrow=2, labels=["a 1", "a 2"], rewards=[0.5, float("nan")])
    a, b = (np.asarray(Image.open(tmp_path / n).convert("L")) for n in ("a.png", "b.png"))
    assert b.shape[0] > a.shape[0]  # a caption line more: the reward
    assert (b[a.shape[0] - 4:] < 100).any()


@pytest.mark.parametrize("when", ["before", "after"])
def test_ctrl_c_says_what_resume_will_do(tmp_path, capsys, monkeypatch, when):
    from flowpo.training import trainer

    out = tmp_path / "run"
    if when == "after":
        _train(capsys, out)

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer.Trainer, "run", interrupted)
    args = ["--resume", out, "train.iterations=3"] if when == "after" else ["--out", out, *TINY,
                                                                            "train.checkpoint_every=10"]
    code, _, err = cli(capsys, "train", *args)
    assert code == 130
    line = err.strip().splitlines()[-1]
    if when == "before":
        assert "before the run's first checkpoint (train.checkpoint_every=10" in line, line
        assert "nothing is kept to continue from" in line and f"--resume {out} starts this run afresh" in line
    else:
        assert f"continue with: flowpo train --resume {out} (from its last checkpoint, iter_000002" in line, line
    assert not (out / ".flowpo.lock").read_text()  # the lock was given back
