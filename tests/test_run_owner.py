"""One owner per run folder (flowpo.training.runlock) and careful checkpoint readers: a second
writer stops in one line naming the holder, a stale lock is taken over, readers never need the
lock, and eval/export/sample pass over (and name) newer checkpoints that do not load."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY, cli, one_line
from flowpo.training import checkpoint
from flowpo.training.runlock import LOCK_NAME, RunBusy, RunLock


def _steps(out: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
            if "reward_mean" in json.loads(x)]


def _holder(out: Path) -> dict:
    text = (out / LOCK_NAME).read_text() if (out / LOCK_NAME).exists() else ""
    return json.loads(text) if text.strip() else {}


def test_a_second_writer_stops_naming_the_holder_and_readers_go_on(tmp_path, capsys):
    out = tmp_path / "run"
    # the first writer: a real process, slow enough to be caught mid-run
    first = subprocess.Popen([sys.executable, "-m", "flowpo", "train", "--out", str(out), *TINY,
                              "train.iterations=400", "eval.every=0"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (_holder(out) and checkpoint.latest(out) is not None):
            assert first.poll() is None, first.stderr.read()[-2000:]
            time.sleep(0.2)
        assert _holder(out).get("pid") == first.pid
        # a second `train` on the same --out: one line naming the holder, nothing written
        rows_before = _steps(out)
        code, _, err = cli(capsys, "train", "--out", out, *TINY)
        line = one_line(err)
        assert code == 2 and f"pid {first.pid} on host {socket.gethostname()} since" in line, line
        # --resume while the first still trains: the same refusal (no Directory-not-empty failure)
        code, _, err = cli(capsys, "train", "--resume", out, "train.iterations=400")
        line = one_line(err)
        assert code == 2 and f"pid {first.pid}" in line and "in use by" in line, line
        # a reader needs no lock and ignores a writer's partial checkpoint folders
        (out / "checkpoints" / "iter_999999.tmp").mkdir(exist_ok=True)
        code, stdout, err = cli(capsys, "eval", "--run", out, "eval.prompts=2")
        assert code == 0, err
        assert "using checkpoint iter_" in err and json.loads(stdout.strip().splitlines()[-1])["step"] >= 1
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=60)
    steps = _steps(out)
    assert steps[:len(rows_before)] == rows_before and steps == list(range(len(steps)))  # one writer's rows only
    assert not _holder(out)  # released on the way out (SIGTERM is a clean exit)


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / LOCK_NAME).write_text(json.dumps({"pid": int(dead.stdout), "host": "elsewhere", "since": 1.0e9}))
    code, _, err = cli(capsys, "train", "--out", out, *TINY, "train.iterations=1")
    assert code == 0, err
    notice = [ln for ln in err.splitlines() if "taking over the lock" in ln]
    assert len(notice) == 1 and f"pid {int(dead.stdout)} on host elsewhere" in notice[0], err
    assert _holder(out) == {} and _steps(out) == [0]


def test_the_lock_is_exclusive_and_released(tmp_path):
    a = RunLock(tmp_path).acquire()
    with pytest.raises(RunBusy, match=f"pid {os.getpid()} on host"):
        RunLock(tmp_path).acquire()  # a second descriptor, even in the same process, is refused
    a.release()
    with RunLock(tmp_path):
        assert _holder(tmp_path)["pid"] == os.getpid()
    assert _holder(tmp_path) == {}


def test_bad_input_leaves_no_run_folder_behind(tmp_path, capsys):
    out = tmp_path / "a" / "b" / "run"
    code, _, err = cli(capsys, "train", "--out", out, *TINY, "reward.names=[pickscor]")
    assert code == 2 and "unknown reward" in one_line(err)
    assert not (tmp_path / "a").exists()  # the folders the lock needed are gone again


@pytest.fixture(scope="module")
def run3(tmp_path_factory):
    """A finished 3-iteration run (checkpoints 2 and 3 kept), copied fresh for each test."""
    out = tmp_path_factory.mktemp("base") / "run"
    from flowpo.cli import main

    assert main(["train", "--out", str(out), *TINY, "train.iterations=3", "train.keep_checkpoints=2",
                 "eval.every=0"]) == 0
    return out


@pytest.fixture
def run(run3, tmp_path):
    import shutil

    shutil.copytree(run3, tmp_path / "run")
    return tmp_path / "run"


def _rewrite_manifest(ck: Path) -> None:
    """Recompute the manifest, as if the damage had been written by flowpo itself."""
    manifest = {f.name: {"sha256": checkpoint._sha256(f), "bytes": f.stat().st_size}
                for f in sorted(ck.iterdir()) if f.name != checkpoint.MANIFEST}
    (ck / checkpoint.MANIFEST).write_text(json.dumps(manifest))


def _damage(ck: Path, how: str, tmp_path: Path) -> None:
    f = ck / "trainable.safetensors"
    if how == "fifo":  # a FIFO in place of the weights, manifest deleted: must not hang
        (ck / checkpoint.MANIFEST).unlink()
        f.unlink()
        os.mkfifo(f)
        return
    if how == "symlink":
        outside = tmp_path / "elsewhere.safetensors"
        outside.write_bytes(f.read_bytes())
        f.unlink()
        f.symlink_to(outside)
        _rewrite_manifest(ck)
        return
    if how == "nan":
        from safetensors.torch import load_file, save_file

        t = load_file(str(f))
        k = sorted(t)[0]
        t[k] = torch.full_like(t[k], float("nan"))
        save_file(t, str(f))
    elif how == "malformed":
        f.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}" + b"\x00" * 32)
    elif how == "shape":
        from safetensors.torch import load_file, save_file

        t = load_file(str(f))
        k = sorted(t)[0]
        t[k] = torch.zeros(3, 5)
        save_file(t, str(f))
    elif how == "iteration":
        state = json.loads((ck / "state.json").read_text())
        state["iteration"] = -5
        (ck / "state.json").write_text(json.dumps(state))
    elif how == "rng":
        state = json.loads((ck / "state.json").read_text())
        state["torch_rng"] = [999, -1, 3]
        (ck / "state.json").write_text(json.dumps(state))
    elif how == "state_bytes":
        (ck / "state.json").write_bytes(b"\xff\xfe not utf-8")
    _rewrite_manifest(ck)


DAMAGE = ["fifo", "symlink", "nan", "malformed", "shape", "iteration", "rng", "state_bytes"]
WORDS = {"fifo": "is a FIFO", "symlink": "symlink out of the run folder", "nan": "non-finite",
         "malformed": "does not", "shape": "has shape", "iteration": "iteration=-5 is out of range",
         "rng": "torch_rng", "state_bytes": "state.json is not UTF-8"}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", DAMAGE)
def test_readers_and_resume_pass_over_a_newest_checkpoint_that_does_not_load(run, tmp_path, capsys, how):
    newest = run / "checkpoints" / "iter_000003"
    _damage(newest, how, tmp_path)
    code, stdout, err = cli(capsys, "eval", "--run", run, "eval.prompts=2")
    assert code == 0, err
    said = [ln for ln in err.splitlines() if "using checkpoint" in ln]
    assert len(said) == 1 and "iter_000002" in said[0] and "skipped newer iter_000003" in said[0], err
    assert WORDS[how] in said[0], said[0]
    assert json.loads(stdout.strip().splitlines()[-1])["step"] == 2
    code, _, err = cli(capsys, "export", "--run", run, "--out", tmp_path / "model")
    assert code == 0 and "using checkpoint iter_000002" in err and (tmp_path / "model").is_dir(), err
    code, _, err = cli(capsys, "sample", "--run", run, "--prompt", "a handwritten 3", "--n", "2",
                       "--out", tmp_path / "s.png")
    assert code == 0 and "using checkpoint iter_000002" in err, err
    code, _, err = cli(capsys, "train", "--resume", run, "train.iterations=4")
    assert code == 0, err
    assert "skipping checkpoint iter_000003" in err and "continuing from iter_000002" in err, err
    assert _steps(run) == [0, 1, 2, 3]


def test_no_loadable_checkpoint_is_one_line_naming_why(run, tmp_path, capsys):
    for name in ("iter_000002", "iter_000003"):
        _damage(run / "checkpoints" / name, "nan", tmp_path)
    code, _, err = cli(capsys, "eval", "--run", run)
    line = one_line(err)
    assert code == 2 and "no intact checkpoint" in line and "non-finite" in line and "trainable.safetensors" in line


def test_export_never_deletes_what_it_did_not_create(run, tmp_path, capsys):
    mine = tmp_path / "model.tmp"
    mine.mkdir()
    (mine / "keep.txt").write_text("the user's")
    code, _, err = cli(capsys, "export", "--run", run, "--out", tmp_path / "model")
    assert code == 0, err
    assert (mine / "keep.txt").read_text() == "the user's"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".model", "model"))) == ["model",
                                                                                                     "model.tmp"]
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o755
    code, _, err = cli(capsys, "export", "--run", run, "--out", tmp_path / "model")
    assert code == 2 and "exists" in one_line(err)


def test_a_full_disk_reported_by_safetensors_is_shown_as_disk_full(tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError

    def full(tensors, path, *a, **k):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')

    monkeypatch.setattr(checkpoint, "save_file", full)
    out = tmp_path / "run"
    code, _, err = cli(capsys, "train", "--out", out, *TINY, "train.iterations=1", "eval.every=0")
    line = one_line(err)
    assert code == 1 and "no space left on the device while writing" in line and "trainable.safetensors" in line
