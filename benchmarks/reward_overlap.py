"""Overlapped reward scoring (reward.overlap) against serial scoring, side by side in one run.

A scorer that sleeps a fixed time per image stands for a slow reward service. The time is
calibrated so that scoring an iteration's images takes as long as sampling them (a reward "as slow
as the rollout"). Each mode trains the embedded default (flow_grpo) for a few iterations. Modes
alternate within one process: none (a zero-cost reward), serial, overlap, and again. The table
gives medians after each run's first iteration: the time from the start of sampling until the
rewards are in (rollout + the wait for the rewards after it) and what the slow reward adds to it
over `none`, as a share of the rollout; and the same for the whole iteration (whose update phase,
2–3× the rollout here, no mode changes).

    python benchmarks/reward_overlap.py --out benchmarks/reward_overlap.csv [--via remote] [--rounds 3] [--threads 1] [--steps 40] [--pin]
    python benchmarks/reward_overlap.py --model sd3 --via remote --out benchmarks/reward_overlap_sd3_remote.csv

--via remote serves the sleeping scorer with `flowpo serve-reward` in another process and
trains against it with the `remote` scorer (the real HTTP path).

--model sd3 trains an SD3.5-Medium transformer at real width (1 of 24 blocks, random weights,
built as benchmarks/real_shapes.py builds it) at 128 px with true CFG, LoRA, instead of the
295k-parameter embedded default: a chunk then samples in about a second rather than 40–150 ms,
as a real model's chunk takes seconds, so what the overlap costs per chunk (a thread hand-off,
an HTTP round trip) is measured against a realistic chunk.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))


def sleepy(images, prompts, metadata, seconds_per_image: float = 0.0):
    """Sleep a fixed time per image, then a cheap per-image score (the pixel mean)."""
    time.sleep(seconds_per_image * images.shape[0])
    return images.float().reshape(images.shape[0], -1).mean(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PIN: dict = {}  # --pin: {"trainer": cores, "service": cores}


def _serve(per_image: float):
    """`flowpo serve-reward` with the sleeping scorer in another process → (process, url)."""
    import requests

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(ROOT / "src")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "flowpo", "serve-reward", "--port", str(port), "--reward",
                             "sleepy=reward_overlap:sleepy", "--option", f"sleepy.seconds_per_image={per_image}"],
                            env=env, preexec_fn=(lambda: os.sched_setaffinity(0, PIN["service"])) if PIN else None)
    for _ in range(300):
        try:
            if requests.get(f"http://127.0.0.1:{port}/v1/health", timeout=1).ok:
                return proc, f"http://127.0.0.1:{port}"
        except requests.RequestException:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the reward server did not come up")


def _train(overrides: list[str], iterations: int) -> list[dict]:
    from flowpo import config
    from flowpo.training.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(config.load(None, "flow_grpo", [*overrides, f"train.iterations={iterations}"]), tmp)
        return [tr.train_iteration(it) for it in range(iterations)]


def _sd3_overrides(work: Path, rows: int, group: int) -> list[str]:
    """An SD3.5-M-width pipeline (1 block, tiny text encoders and VAE) saved under `work`, and the
    overrides that train it (real_shapes.py's setup: 128 px, guidance 4.5, LoRA r 32)."""
    sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests")]
    from real_shapes import PROMPTS, build_pipeline
    from tiny_pipelines import save_tiny

    folder = work / "sd3_d1"
    if not (folder / "model_index.json").exists():
        save_tiny(build_pipeline("sd3", 1, (1, 1)), folder)
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[: rows // group]) + "\n")
    return [f"model.kind=sd3", f"model.path={folder}", "model.mode=lora", "model.lora_rank=32", "model.lora_alpha=64",
            "model.resolution=128", "model.max_sequence_length=16", "sample.guidance=4.5",
            f"sample.prompts_file={prompts}", "train.minibatches=1"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/reward_overlap.csv")
    ap.add_argument("--via", choices=["local", "remote"], default="local")
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=2, help="sample.batch_size (rows per rollout chunk)")
    ap.add_argument("--steps", type=int, default=10, help="sample.steps (longer chunks: less per-call overhead)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the trainer (the rest of the cores: "
                                                          "the service)")
    ap.add_argument("--model", choices=["embedded", "sd3"], default="embedded",
                    help="sd3: an SD3.5-M transformer at real width, 1 block, 128 px (see above)")
    ap.add_argument("--scale", type=float, default=1.0, help="the reward's time ÷ the rollout's, as calibrated")
    ap.add_argument("--rows", type=int, default=16, help="rows per iteration (prompts × group size 4)")
    ap.add_argument("--work", default=None, help="--model sd3: folder for the built pipeline (kept; default: temporary)")
    ap.add_argument("--pin", action="store_true", help="trainer on core 0, the service on core 1 (as if the service "
                                                       "had its own hardware; implies --threads 1)")
    args = ap.parse_args()
    if args.pin:
        PIN.update(trainer={0}, service={1})
        os.sched_setaffinity(0, PIN["trainer"])
        args.threads = 1
    torch.set_num_threads(args.threads)
    rows, group = args.rows, 4
    if rows % group or rows < group:
        ap.error(f"--rows {rows}: a multiple of the group size {group}")
    if args.model == "sd3" and rows // group > 8:
        ap.error(f"--rows {rows}: --model sd3 has 8 prompts, so at most 32 rows")
    base = [f"sample.steps={args.steps}", f"sample.prompts_per_iteration={rows // group}", f"sample.group_size={group}",
            f"sample.batch_size={args.chunk}", "eval.every=0", "log.progress=false", "log.tensorboard=false",
            "log.grids=false", "train.checkpoint_every=0", f"train.threads={args.threads}"]
    work = None
    if args.model == "sd3":
        work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="reward_overlap_"))
        base += _sd3_overrides(work, rows, group)
    calib = _train([*base, "reward.names=[reward_overlap:sleepy]"], 6)
    per_image = args.scale * statistics.median(r["time/rollout_s"] for r in calib[2:]) / rows
    print(f"calibration: rollout {per_image * rows:.3f} s per iteration → {per_image * 1e3:.1f} ms per image")

    server = None
    if args.via == "remote":  # the HTTP round trips count as reward time: calibrate so that the whole
        # remote reward (sleep + round trips, as the overlapped mode makes them) is as slow as the rollout
        server, url = _serve(0.0)
        remote = ["reward.names=[remote]", f"reward.options.remote.url={url}", "reward.options.remote.dtype=float32"]
        zero = _train([*base, *remote, "reward.overlap=true"], 6)
        server.kill()
        trips = statistics.median(r["time/reward_busy_s"] for r in zero[2:])
        per_image = max(0.0, per_image * rows - trips) / rows
        print(f"calibration: HTTP round trips {trips:.3f} s per iteration → sleep {per_image * 1e3:.1f} ms per image")
        server, url = _serve(per_image)
        slow = ["reward.names=[remote]", f"reward.options.remote.url={url}", "reward.options.remote.dtype=float32"]
    else:
        slow = ["reward.names=[reward_overlap:sleepy]",
                f"reward.options.reward_overlap:sleepy.seconds_per_image={per_image}"]
    modes = {"none": ["reward.names=[reward_overlap:sleepy]"], "serial": [*slow, "reward.overlap=false"],
             "overlap": [*slow, "reward.overlap=true"]}
    times: dict[str, list[dict]] = {m: [] for m in modes}
    try:
        for _ in range(args.rounds):
            for m, ov in modes.items():
                times[m] += _train([*base, *ov], args.iterations)[1:]
    finally:
        if server is not None:
            server.kill()
        if work is not None and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    keys = ("time/iteration_s", "time/rollout_s", "time/reward_s")
    busy = {m: statistics.median(r.get("time/reward_busy_s", r["time/reward_s"]) for r in rs) for m, rs in times.items()}
    med = {m: {k: statistics.median(r[k] for r in rs) for k in keys} for m, rs in times.items()}
    for m, rs in times.items():  # sampling until the rewards are in (the update is the same in every mode)
        med[m]["phase"] = statistics.median(r["time/rollout_s"] + r["time/reward_s"] for r in rs)
    none_it, none_roll, none_phase = (med["none"][k] for k in ("time/iteration_s", "time/rollout_s", "phase"))
    out = []
    for m in modes:
        it, phase = med[m]["time/iteration_s"], med[m]["phase"]
        out.append({"mode": m, "model": args.model, "via": args.via, "pinned": args.pin, "steps": args.steps, "trainer_threads": args.threads, "rows": rows, "chunk_rows": args.chunk,
                    "scorer_s_per_image": per_image if m != "none" else 0.0, "scorer_s_per_iteration":
                    per_image * rows if m != "none" else 0.0,
                    "reward_busy_s": busy[m] if m != "none" else 0.0,
                    "reward_over_rollout": busy[m] / med["none"]["time/rollout_s"] if m != "none" else 0.0,
                    "rollout_s": med[m]["time/rollout_s"], "reward_wait_s": med[m]["time/reward_s"],
                    "rollout_plus_wait_s": phase, "added_pct_of_rollout": 100 * (phase - none_phase) / none_roll,
                    "iteration_s": it, "added_pct_of_iteration": 100 * (it - none_it) / none_it,
                    "iterations_timed": len(times[m])})
    from flowpo.bench.report import write_csv

    write_csv(Path(args.out), out)
    for r in out:
        print(f"{r['mode']:>8}: rollout {r['rollout_s']:.3f} s + wait for rewards {r['reward_wait_s']:.3f} s "
              f"= {r['rollout_plus_wait_s']:.3f} s ({r['added_pct_of_rollout']:+.0f}% of the rollout); iteration "
              f"{r['iteration_s']:.3f} s ({r['added_pct_of_iteration']:+.0f}%); reward ÷ rollout "
              f"{r['reward_over_rollout']:.2f}")

if __name__ == "__main__":
    main()
