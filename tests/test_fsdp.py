"""Full fine-tuning sharded with FSDP2 between steps (docs/distributed.md, "FSDP2"): 2 gloo ranks
end with the weights of 1 process, for the method presets; every model call is a collective, so
this also checks that the ranks lock-step their calls (a deadlock would time out)."""
import json
import os
import subprocess
import time
import sys
from pathlib import Path

import pytest
import torch

from flowpo import config
from flowpo.rollout import make_chunks, stream_seed
from flowpo.training.trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
SRC = str(Path(__file__).resolve().parent.parent / "src")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
# batch 2 over 8 rows: global chunks of 2 rows, some wholly on one rank (the other runs a dummy
# row); eval 5 prompts: 3 and 2 rows per rank, 2 and 1 chunks (padded to 2)
FULL = ["reward.names=[stroke_quality]", "train.weight_decay=0", "log.grids=false", "model.mode=full",
        "train.lr=1e-4", "train.iterations=3", "sample.batch_size=2", "eval.prompts=5", "eval.every=3",
        "train.checkpoint_every=3", "train.threads=1"]


def env(**extra) -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    e.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]))
    e.update(extra)
    return e


def torchrun(n: int, args: list[str], timeout: float = 300, **extra) -> subprocess.CompletedProcess:
    r = subprocess.run(TORCHRUN + [f"--nproc_per_node={n}", "-m", "flowpo"] + args, env=env(**extra),
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    from flowpo.training import checkpoint

    ck = sorted((out / "checkpoints").iterdir())[-1]
    return checkpoint.load(ck)[0]["trainable"]   # a sharded checkpoint consolidated


def one_process(out: Path, preset: str, args: list[str]) -> dict[str, torch.Tensor]:
    """Train in this process; returns the initial trainable weights."""
    tr = Trainer(config.load(None, preset, args), out)
    base = {k: v.detach().clone() for k, v in tr.policy.trainable_state_dict().items()}
    tr.run()
    return base


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_the_settings_leave_a_rank_without_rows_in_some_chunk(tiny):
    # the lock-step's dummy rows are exercised: iteration 0 of FULL has a chunk all on one rank
    cfg = config.load(None, None, tiny + FULL)
    n = cfg.sample.prompts_per_iteration * cfg.sample.group_size
    chunks = make_chunks(n, cfg.sample.batch_size, torch.Generator().manual_seed(stream_seed(cfg.train.seed, 0, 5)))
    assert any(bool((c < n // 2).all()) or bool((c >= n // 2).all()) for c in chunks)


@pytest.mark.slow
@pytest.mark.ci  # the point of issue 21: sharded full fine-tuning equals one process, per preset (~8 s each)
@pytest.mark.parametrize("preset,extra", [("flow_grpo", []), ("mix_grpo_flash", []), ("op_grpo", []),
                                          ("stepwise_grpo", []),
                                          # the replayed chunk in minibatch 0: π_old from the update's forward;
                                          # one group, one replayed row: the other rank holds none
                                          ("op_grpo_per_step_is", ["train.minibatches=1",
                                                                   "sample.prompts_per_iteration=1"]),
                                          # ℓ_old from the update's forward on minibatch 0's chunks (uniform:
                                          # ghuber's p = 0.25 amplifies the ranks' rounding to 1.8e-5); one
                                          # minibatch: no pass at all, and a rank's empty part of a chunk
                                          ("awm", ["objective.old_ramp=0.3", "objective.awm_weighting=uniform",
                                                   "train.minibatches=2"]),
                                          ("awm", ["objective.old_ramp=0.3", "objective.awm_weighting=uniform",
                                                   "train.minibatches=1"])])
def test_fsdp2_sharded_full_fine_tuning_two_ranks_equal_one(tmp_path, tiny, preset, extra):
    if preset.startswith("op_grpo"):  # a tiny prompt pool so that replays are admitted (and tails regenerated)
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("a handwritten 3\na handwritten 7\n")
        extra = extra + [f"sample.prompts_file={prompts}"]
    args = tiny + FULL + extra
    base = one_process(tmp_path / "one", preset, args)
    torchrun(2, ["train", "--preset", preset, "--out", str(tmp_path / "two")] + args)
    if preset.startswith("op_grpo"):
        lines = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines() if x.strip()]
        assert any(x.get("replay/admitted", 0) > 0 for x in lines)
    worst = max_diff(final_weights(tmp_path / "one"), final_weights(tmp_path / "two"))
    print(f"{preset}: max |Δθ| = {worst:.2e}")
    assert worst < 1e-5, worst
    assert max_diff(base, final_weights(tmp_path / "one")) > 1e-4  # and the weights did move


@pytest.mark.slow  # issue 30's objectives sharded: the μ_old pass and DGPO's group sums under lock-step (~10 s each)
@pytest.mark.parametrize("preset,extra", [("dgpo", ["plan.num_steps=2", "objective.old_ramp=0.3",
                                                    "sample.prompts_per_iteration=3", "sample.group_size=2"]),
                                          ("grpo_guard", ["train.lr=3e-4"]),
                                          ("flow_dppo", ["plan.num_steps=2", "objective.dppo_threshold=0"])])
def test_fsdp2_two_ranks_equal_one_new_objectives(tmp_path, tiny, preset, extra):
    args = tiny + FULL + extra
    base = one_process(tmp_path / "one", preset, args)
    torchrun(2, ["train", "--preset", preset, "--out", str(tmp_path / "two")] + args)
    worst = max_diff(final_weights(tmp_path / "one"), final_weights(tmp_path / "two"))
    print(f"{preset}: max |Δθ| = {worst:.2e}")
    assert worst < 1e-5, worst
    assert max_diff(base, final_weights(tmp_path / "one")) > 1e-4


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from tiny_pipelines import save_tiny, tiny_sd3_pipeline

    return save_tiny(tiny_sd3_pipeline(seed=0), tmp_path_factory.mktemp("tiny") / "sd3")


def sd3_args(folder) -> list[str]:
    from tiny_pipelines import T5_LENGTH

    return [f"model.kind=sd3", f"model.path={folder}", "model.mode=full", f"model.max_sequence_length={T5_LENGTH}",
            "model.resolution=16", "train.iterations=3", "train.lr=1e-4", "train.weight_decay=0",
            "sample.steps=4", "sample.prompts_per_iteration=2", "sample.group_size=4", "sample.batch_size=2",
            "sample.guidance=2.0", "eval.prompts=3", "eval.samples_per_prompt=1", "eval.steps=3", "eval.every=3",
            "train.checkpoint_every=3", "advantage.substeps=2", "plan.window_size=2",
            "reward.names=[tiny_pipelines:brightness_reward]", "log.progress=false", "log.tensorboard=false",
            "log.grids=false", "train.threads=1"]


@pytest.mark.slow
@pytest.mark.ci  # the diffusers path (SD3 transformer blocks sharded, reference copy sharded): ~10 s each
@pytest.mark.parametrize("preset", ["flow_grpo", "mix_grpo_flash", "op_grpo", "stepwise_grpo"])
def test_fsdp2_tiny_sd3_full_two_ranks_equal_one(tmp_path, tiny_sd3, preset):
    tests_dir = str(Path(__file__).resolve().parent)
    args = sd3_args(tiny_sd3)
    if preset == "op_grpo":
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("a red cat\na blue dog\n")
        args.append(f"sample.prompts_file={prompts}")
    base = one_process(tmp_path / "one", preset, args)
    torchrun(2, ["train", "--preset", preset, "--out", str(tmp_path / "two")] + args,
             PYTHONPATH=os.pathsep.join([SRC, tests_dir]))
    worst = max_diff(final_weights(tmp_path / "one"), final_weights(tmp_path / "two"))
    print(f"sd3 {preset}: max |Δθ| = {worst:.2e}")
    assert worst < 1e-5, worst
    assert max_diff(base, final_weights(tmp_path / "one")) > 1e-4  # and the weights did move


@pytest.mark.slow
@pytest.mark.ci  # sharded checkpoints: resume on another number of ranks, both ways (~7 s)
def test_sharded_checkpoint_resumes_on_another_number_of_ranks(tmp_path, tiny):
    from flowpo.training import checkpoint

    args = tiny + FULL + ["train.ema=0.9", "train.checkpoint_every=1", "eval.every=0"]
    one_process(tmp_path / "one", None, args)                         # uninterrupted, 3 iterations
    run = tmp_path / "chain"
    one_process(run, None, args + ["train.iterations=1"])  # 1 process: iteration 1 (not sharded)
    torchrun(2, ["train", "--resume", str(run), "train.iterations=2"])  # 2 ranks read their rows of it
    ck2 = checkpoint.latest(run)
    names = sorted(p.name for p in ck2.iterdir())
    assert "trainable.rank00000-of-00002.safetensors" in names and "trainable.rank00001-of-00002.safetensors" in names
    assert "trainable.safetensors" not in names                       # no full copy was written
    from flowpo.cli import main

    assert main(["train", "--resume", str(run), "train.iterations=3"]) == 0  # 1 process from the 2-rank shards
    ga, gb = checkpoint.load(checkpoint.latest(tmp_path / "one"))[0], checkpoint.load(checkpoint.latest(run))[0]
    assert set(ga) == set(gb) == {"trainable", "optimizer", "ema"}
    for g in ga:
        worst = max_diff(ga[g], gb[g])
        assert worst < 1e-5, (g, worst)


@pytest.mark.slow
@pytest.mark.ci  # the consolidated export of a sharded run loads in diffusers (~15 s)
def test_sharded_run_exports_a_transformer_folder_diffusers_loads(tmp_path, tiny_sd3):
    from diffusers import SD3Transformer2DModel

    from flowpo.training import checkpoint

    tests_dir = str(Path(__file__).resolve().parent)
    args = sd3_args(tiny_sd3) + ["train.iterations=1", "train.checkpoint_every=1", "eval.every=0"]
    torchrun(2, ["train", "--out", str(tmp_path / "two")] + args, PYTHONPATH=os.pathsep.join([SRC, tests_dir]))
    r = subprocess.run([sys.executable, "-m", "flowpo", "export", "--run", str(tmp_path / "two"), "--out",
                        str(tmp_path / "export")], env=env(PYTHONPATH=os.pathsep.join([SRC, tests_dir])),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    model = SD3Transformer2DModel.from_pretrained(str(tmp_path / "export" / "transformer"))
    trained = checkpoint.load(checkpoint.latest(tmp_path / "two"))[0]["trainable"]
    loaded = model.state_dict()
    assert set(trained) <= set(loaded)
    assert max_diff(trained, {k: loaded[k] for k in trained}) == 0.0


# ---------------------------------------------------------------------------- faults
FAULTY_REWARD = '''
import os, signal, time
from flowpo.embedded.rewards import stroke_quality
CALLS = [0]
def score(images, prompts):
    """stroke_quality; on rank 1, call FAULT_AT (rollout rewards of iteration 2 here) dies or stalls."""
    CALLS[0] += 1
    if os.environ.get("RANK") == "1" and CALLS[0] == int(os.environ.get("FAULT_AT", "0")):
        if os.environ["FAULT"] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(3600)
    return stroke_quality(images, prompts)
'''


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["kill", "stall"])
def test_a_rank_lost_mid_iteration_stops_every_rank_in_time_naming_it_and_resume_continues(tmp_path, tiny, fault,
                                                                                            monkeypatch):
    # stepwise_grpo: after its own reward the survivor goes on to the (sharded) Tweedie estimates,
    # whose first collective is where it finds rank 1 gone
    (tmp_path / "faulty.py").write_text(FAULTY_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    args = tiny + FULL + ["reward.names=[faulty:score]", "train.checkpoint_every=1", "eval.every=0",
                          "advantage.substeps=1"]
    path = os.pathsep.join([SRC, str(tmp_path)])
    timeout_s = 10
    t0 = time.time()
    # reward calls: preflight 1, evaluation 2, then 2 per iteration (final, Tweedie): the 7th is
    # iteration 2's rollout reward (checkpoint 2 exists)
    r = subprocess.run(TORCHRUN + ["--nproc_per_node=2", "-m", "flowpo", "train", "--preset", "stepwise_grpo",
                                   "--out", str(tmp_path / "run")] + args,
                       env=env(PYTHONPATH=path, FAULT=fault, FAULT_AT="7", FLOWPO_DIST_TIMEOUT_S=str(timeout_s)),
                       capture_output=True, text=True, timeout=300)
    took = time.time() - t0
    log = r.stdout + r.stderr
    print(f"{fault}: all ranks gone after {took:.1f}s;", [x for x in log.splitlines() if "flowpo: error" in x][:2])
    assert r.returncode != 0
    assert took < 60 + timeout_s, took          # startup + 2 iterations + the timeout, not forever
    if fault == "stall":                        # the survivor names the rank that did not arrive
        assert "rank 0/2" in log and "rank 1 last entered collective" in log and "stalled or dead" in log, log[-3000:]
    else:                                       # a dead rank: the survivor's error or torchrun names rank 1
        assert ("rank 1 last entered collective" in log) or ("rank      : 1" in log and "-9" in log), log[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "iter_000002").is_dir()
    torchrun(2, ["train", "--resume", str(tmp_path / "run")], PYTHONPATH=path)    # continues to iteration 3
    one_process(tmp_path / "one", "stepwise_grpo", args)
    worst = max_diff(final_weights(tmp_path / "one"), final_weights(tmp_path / "run"))
    assert worst < 1e-5, worst


def test_a_kill_during_a_sharded_save_leaves_the_previous_checkpoint_usable(tmp_path):
    from flowpo.training import checkpoint

    tensors = {"trainable": {"w": torch.arange(6.0).reshape(3, 2)}}
    checkpoint.save(tmp_path, 1, tensors=tensors, state={"iteration": 1}, keep=2)

    class Killed(BaseException):
        pass

    calls = []

    def barrier():  # the 2nd barrier: this rank's shards are written; it dies before the manifest
        calls.append(1)
        if len(calls) == 2:
            raise Killed

    with pytest.raises(Killed):
        checkpoint.save_sharded(tmp_path, 2, tensors={"trainable": {"w": torch.zeros(3, 2)}}, state={"iteration": 2},
                                keep=2, rank=0, world=2, barrier=barrier)
    assert (tmp_path / "checkpoints" / "iter_000002.tmp").is_dir()     # the partial save is left aside...
    path, skipped = checkpoint.latest_intact(tmp_path)
    assert path.name == "iter_000001" and skipped == []                 # ...and the previous one is what loads
    assert torch.equal(checkpoint.load(path)[0]["trainable"]["w"], tensors["trainable"]["w"])
    checkpoint.save_sharded(tmp_path, 2, tensors={"trainable": {"w": torch.ones(3, 2)}}, state={"iteration": 2},
                            keep=2, rank=0, world=1, barrier=lambda: None)  # the next save replaces the partial one
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["iter_000001", "iter_000002"]
    assert checkpoint.verify(tmp_path / "checkpoints" / "iter_000002") is None


KILL_IN_SAVE = '''
import os, signal, sys
from flowpo.training import checkpoint

_save = checkpoint.save_sharded


def save_sharded(root, iteration, **kw):
    """Rank 1 is SIGKILLed inside the save of iteration 2, once its shards are on disk and before
    rank 0 writes the manifest (the 2nd barrier of save_sharded)."""
    if iteration == 2 and kw["rank"] == 1:
        seen, barrier = [], kw["barrier"]

        def dying_barrier():
            seen.append(1)
            if len(seen) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            barrier()

        kw["barrier"] = dying_barrier
    return _save(root, iteration, **kw)


checkpoint.save_sharded = save_sharded
from flowpo.cli import main

sys.exit(main())
'''


@pytest.mark.slow
@pytest.mark.ci  # a real SIGKILL mid-save under torchrun: ~15 s
def test_a_rank_sigkilled_during_a_sharded_save_leaves_the_previous_checkpoint_and_resume_continues(tmp_path, tiny):
    """The real thing (the in-process simulation above runs in CI): torchrun, 2 ranks, rank 1
    SIGKILLed mid-save; the survivor stops within the stall timeout, checkpoint 1 is intact,
    `--resume` on 2 ranks ends with the uninterrupted 1-process weights."""
    (tmp_path / "kill_in_save.py").write_text(KILL_IN_SAVE)
    args = tiny + FULL + ["train.checkpoint_every=1", "eval.every=0"]
    t0 = time.time()
    r = subprocess.run(TORCHRUN + ["--nproc_per_node=2", str(tmp_path / "kill_in_save.py"), "train", "--out",
                                   str(tmp_path / "run")] + args,
                       env=env(FLOWPO_DIST_TIMEOUT_S="10"), capture_output=True, text=True, timeout=300)
    took = time.time() - t0
    assert r.returncode != 0 and took < 90, (took, (r.stdout + r.stderr)[-2000:])
    ck = tmp_path / "run" / "checkpoints"
    names = sorted(p.name for p in ck.iterdir())
    assert "iter_000001" in names and "iter_000002" not in names, names   # the partial save never became one
    torchrun(2, ["train", "--resume", str(tmp_path / "run")])
    one_process(tmp_path / "one", None, args)
    assert max_diff(final_weights(tmp_path / "one"), final_weights(tmp_path / "run")) < 1e-5


@pytest.mark.slow  # the editing policies (source tokens appended, sources in metadata) sharded: ~15 s each
@pytest.mark.parametrize("kind", ["flux_kontext", "qwen_image_edit"])
def test_fsdp2_tiny_editing_full_two_ranks_equal_one(tmp_path, kind):
    pytest.importorskip("diffusers")
    import tiny_edit_pipelines as tp
    import tiny_pipelines

    if kind == "flux_kontext":
        folder = tiny_pipelines.save_tiny(tp.tiny_flux_kontext_pipeline(seed=0), tmp_path / "kontext")
        extra = [f"model.max_sequence_length={tiny_pipelines.T5_LENGTH}", "model.max_area=256", "model.image_resolution=16",
                 "sample.guidance=2.5"]
    else:
        folder = tp.save_tiny_qwen_edit(tp.tiny_qwen_image_edit_pipeline(seed=0, zero_cond_t=True), tmp_path / "qe")
        extra = ["model.max_sequence_length=400", "model.image_resolution=32", "sample.guidance=4.0"]
    names = tp.write_source_images(tmp_path / "img", n=2, size=(16, 16) if kind == "flux_kontext" else (32, 32))
    prompts = tmp_path / "edits.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "image": f"img/{n}"}) + "\n"
                               for p, n in zip(["a red cat", "a blue dog"], names)))
    args = [f"model.kind={kind}", f"model.path={folder}", "model.mode=full", "model.resolution=16",
            "train.iterations=2", "train.lr=1e-4", "train.weight_decay=0", "sample.steps=3",
            "sample.prompts_per_iteration=2", "sample.group_size=2", "sample.batch_size=1",
            f"sample.prompts_file={prompts}", f"eval.prompts_file={prompts}", "eval.prompts=3",
            "eval.samples_per_prompt=1", "eval.steps=2", "eval.every=2", "train.checkpoint_every=2",
            "reward.names=[tiny_pipelines:brightness_reward]", "log.progress=false", "log.tensorboard=false",
            "log.grids=false", "train.threads=1", *extra]
    base = one_process(tmp_path / "one", "flow_grpo", args)
    torchrun(2, ["train", "--preset", "flow_grpo", "--out", str(tmp_path / "two")] + args,
             PYTHONPATH=os.pathsep.join([SRC, str(Path(__file__).resolve().parent)]))
    worst = max_diff(final_weights(tmp_path / "one"), final_weights(tmp_path / "two"))
    print(f"{kind}: max |Δθ| = {worst:.2e}")
    assert worst < 1e-5, worst
    assert max_diff(base, final_weights(tmp_path / "one")) > 1e-4
