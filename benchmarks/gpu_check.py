"""GPU checks that CI cannot run: CPU/GPU parity of the trainer, and the diffusers adapters on a GPU.

    python benchmarks/gpu_check.py --out runs/gpu_check [--device cuda] [--parts parity,tiny]

`parity`: for each preset, the same config and seed on the CPU and on the device, a few training
iterations and one evaluation each. Rollout noise is drawn on the CPU from per-row seeds
(flowpo.rollout.row_noise), so both devices start from identical noise; TF32 is switched off so
the device computes in true fp32. The differences left are rounding, amplified by sampling and
by the updates: the table gives, per quantity, |cpu − device| beside the quantity's own scale, and
for the trained weights max |θ_cpu − θ_dev| beside max |θ − θ_init| (how far the updates moved them).

`tiny`: the tiny random-weight SD3 / FLUX / Wan pipelines of tests/tiny_pipelines.py on the
device, in bf16 with gradient checkpointing (the settings of configs/*.yaml): velocity parity
against the CPU in fp32, then one training iteration per preset (finite loss, LoRA weights move,
first ratio ≈ 1, peak memory), then `flowpo train` end to end (eval, checkpoint, resume).

Writes parity.csv, tiny.csv and gpu_check.md under --out; exits 1 if a check fails.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # tiny_pipelines

from flowpo import config  # noqa: E402
from flowpo.parts import restore_attention, set_attention  # noqa: E402
from flowpo.training.trainer import Trainer  # noqa: E402

QUIET = ["log.tensorboard=false", "log.progress=false", "log.grids=false"]
PARITY_KEYS = ["reward_mean", "stats/ratio_mean", "stats/approx_kl", "loss/policy", "stats/grad_norm"]


def _non_finite_keys(rec: dict) -> list[str]:
    return [k for k, v in rec.items() if isinstance(v, float) and not math.isfinite(v)]


def parity(presets: list[str], device: str, iterations: int, tmp: Path, threads: int) -> list[dict]:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rows = []
    for p in presets:
        res = []
        try:
            for side, dev in (("cpu", "cpu"), ("device", device)):
                cfg = config.load(None, p, QUIET + [f"model.device={dev}", f"train.threads={threads}"])
                tr = Trainer(cfg, tmp / "parity" / p / side)
                init = [t.detach().float().cpu().clone() for t in tr.params]
                recs = [tr.train_iteration(i) for i in range(iterations)]
                ev = tr.evaluate()
                res.append((recs, ev, init, [t.detach().float().cpu().clone() for t in tr.params]))
        except Exception as e:  # report and go on with the next preset
            traceback.print_exc()
            rows.append({"preset": p, "what": "non-finite numbers on device", "cpu": "",
                         "device": f"FAILED {type(e).__name__}: {e}", "abs_diff": 1.0, "scale": 0.0})
            continue
        (rc, ec, init, pc), (rd, ed, _, pd) = res
        moved = max(float((a - b).abs().max()) for a, b in zip(pc, init))
        wdiff = max(float((a - b).abs().max()) for a, b in zip(pc, pd))
        bad = _non_finite_keys(rd[-1]) + _non_finite_keys(ed)
        for i in range(iterations):
            for k in PARITY_KEYS:
                if k in rc[i]:
                    rows.append({"preset": p, "what": f"iteration {i} {k}", "cpu": rc[i][k], "device": rd[i][k],
                                 "abs_diff": abs(rc[i][k] - rd[i][k]), "scale": abs(rc[i][k])})
        rows.append({"preset": p, "what": "eval_reward_mean", "cpu": ec["eval_reward_mean"],
                     "device": ed["eval_reward_mean"],
                     "abs_diff": abs(ec["eval_reward_mean"] - ed["eval_reward_mean"]),
                     "scale": abs(ec["eval_reward_mean"])})
        rows.append({"preset": p, "what": "weights max|Δ| (scale: max|θ−θ_init|)", "cpu": moved, "device": "",
                     "abs_diff": wdiff, "scale": moved})
        rows.append({"preset": p, "what": "non-finite numbers on device", "cpu": "", "device": ",".join(bad) or "none",
                     "abs_diff": float(len(bad)), "scale": 0.0})
        print(f"parity {p:<16} eval cpu {ec['eval_reward_mean']:.4f} dev {ed['eval_reward_mean']:.4f}  "
              f"weights |Δ| {wdiff:.2e} (moved {moved:.2e})  non-finite: {bad or 'none'}", flush=True)
    return rows


def _sdpa(math_only: bool):
    """Force PyTorch's reference (math) attention kernel, or leave the choice to PyTorch."""
    import contextlib

    if not math_only:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def tiny(device: str, presets: list[str], tmp: Path, kinds: list[str], modes: list[str]) -> list[dict]:
    from tiny_pipelines import T5_LENGTH, save_tiny, tiny_flux_pipeline, tiny_sd3_pipeline, tiny_wan_pipeline

    from flowpo.policy.registry import build_policy

    build = {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline, "wan": tiny_wan_pipeline}
    res = {"sd3": 16, "flux": 16, "wan": 32}
    rows = []
    for kind in kinds:
        folder = save_tiny(build[kind](seed=0), tmp / "tiny" / kind)
        opts = {"resolution": res[kind], "max_sequence_length": T5_LENGTH}
        if kind == "wan":
            opts["num_frames"] = 5
        # velocity and LoRA-gradient parity, CPU vs device, LoRA perturbed away from identity;
        # fp32 and bf16 (each device's own bf16 kernels, so bf16 differences are larger)
        for dtn in ("fp32", "bf16"):
            v, grad = {}, {}
            for side, dev in (("cpu", "cpu"), ("device", device)):
                pol = build_policy(kind, folder, device=dev, dtype=dtn, **opts)
                gen = torch.Generator().manual_seed(1)
                state = {k: torch.randn(t.shape, generator=gen) * 0.3 for k, t in pol.trainable_state_dict().items()}
                pol.load_trainable_state_dict(state)
                x = torch.randn(2, *pol.latent_shape, generator=gen)
                sigma = torch.tensor([0.3, 0.8])
                cond = pol.encode_prompts(["a red cat", "a blue dog"])
                out = pol.velocity(x.to(pol.device), sigma.to(pol.device), cond, guidance=3.5 if kind == "flux" else 2.0)
                out.float().pow(2).mean().backward()
                v[side] = out.detach().float().cpu()
                grad[side] = torch.cat([p.grad.detach().float().flatten().cpu() for p in pol.trainable_parameters()])
            d = float((v["cpu"] - v["device"]).abs().max())
            scale = float(v["cpu"].abs().max())
            tol = 1e-3 if dtn == "fp32" else 5e-2
            rows.append({"kind": kind, "preset": "-", "check": f"{dtn} velocity max|cpu−dev| (scale: max|v|)",
                         "value": d, "scale": scale, "ok": d <= tol * scale})
            gd, gs = float((grad["cpu"] - grad["device"]).abs().max()), float(grad["cpu"].abs().max())
            nonfinite = int((~torch.isfinite(grad["device"])).sum())
            rows.append({"kind": kind, "preset": "-", "check": f"{dtn} LoRA grad max|cpu−dev| (scale: max|g|)",
                         "value": gd, "scale": gs, "ok": nonfinite == 0 and gd <= 10 * tol * gs,
                         "detail": f"non-finite on device: {nonfinite}"})
            print(f"tiny {kind} {dtn} velocity |cpu−dev| {d:.2e} (|v| {scale:.2f}); grad |cpu−dev| {gd:.2e} "
                  f"(|g| {gs:.2e}), non-finite {nonfinite}", flush=True)
        for mode in modes:
            parts = mode.split("+")
            dtype, ckpt, math_sdpa, attn = parts[0], "ckpt" in parts, "math" in parts, "attn" in parts
            for p in presets:
                cfg = config.load(None, p, QUIET + [
                    f"model.kind={kind}", f"model.path={folder}", f"model.device={device}", f"model.dtype={dtype}",
                    f"model.gradient_checkpointing={str(ckpt).lower()}", "model.lora_rank=4", "model.lora_alpha=8",
                    f"model.resolution={res[kind]}", f"model.max_sequence_length={T5_LENGTH}",
                    *(["model.num_frames=5"] if kind == "wan" else []),
                    "eval.prompts=2", "eval.samples_per_prompt=1", "eval.steps=3", "sample.steps=4",
                    "sample.prompts_per_iteration=2", "sample.group_size=3", "sample.batch_size=6",
                    f"sample.guidance={3.5 if kind == 'flux' else 2.0}",
                    "reward.names=[tiny_pipelines:brightness_reward]", "train.minibatches=1", "train.weight_decay=0",
                    "advantage.substeps=2", "plan.window_size=2",
                    *(["model.attention=math"] if attn else [])])
                row = {"kind": kind, "preset": p, "check": f"{mode}: one iteration"}
                tr = None
                flags = set_attention("auto")  # the flags now; model.attention may change them
                try:
                    tr = Trainer(cfg, tmp / "tiny_runs" / kind / mode / p)
                    before = {k: t.detach().clone() for k, t in tr.policy.trainable_state_dict().items()}
                    gpu = tr.device.type == "cuda"
                    if gpu:
                        torch.cuda.reset_peak_memory_stats(tr.device)
                    t0 = time.perf_counter()
                    with _sdpa(math_sdpa):
                        rec = tr.train_iteration(0)
                    if gpu:
                        torch.cuda.synchronize(tr.device)
                    secs = time.perf_counter() - t0
                    peak = torch.cuda.max_memory_allocated(tr.device) / 2**20 if gpu else float("nan")
                    after = tr.policy.trainable_state_dict()
                    moved = any(not torch.equal(before[k], after[k]) for k in before)
                    bad = _non_finite_keys(rec)
                    ev = tr.evaluate()
                    row.update(value=rec["stats/ratio_mean"], scale=rec["stats/ratio_max"],
                               ok=moved and not bad and math.isfinite(ev["eval_reward_mean"])
                               and abs(rec["stats/ratio_mean"] - 1) < 1e-2,
                               detail=f"{secs:.2f} s, peak {peak:.0f} MiB, LoRA moved {moved}, "
                                      f"non-finite {bad or 'none'}, eval {ev['eval_reward_mean']:.4f}")
                except Exception as e:  # report and go on: one failure must not hide the others
                    bad_grads = [] if tr is None else [n for n, q in tr.policy.module.named_parameters()
                                                       if q.grad is not None and not torch.isfinite(q.grad).all()]
                    row.update(value=float("nan"), scale=float("nan"), ok=False,
                               detail=f"{type(e).__name__}: {e}; non-finite grads in {len(bad_grads)} tensors, "
                                      f"e.g. {bad_grads[:3]}")
                    traceback.print_exc()
                finally:
                    restore_attention(flags)
                rows.append(row)
                print(f"tiny {kind} {mode} {p:<16} ok={row['ok']} ratio {row['value']:.4f}  {row.get('detail', '')}",
                      flush=True)
    return rows


def cli_end_to_end(device: str, tmp: Path) -> dict:
    """`flowpo train --preset flowpo_flash` (stepwise credit, replay, window, DPM) on the tiny SD3
    folder: 2 iterations, eval, checkpoint (with the replay buffer); then --resume to 3."""
    from tiny_pipelines import T5_LENGTH, save_tiny, tiny_sd3_pipeline

    folder = save_tiny(tiny_sd3_pipeline(seed=0), tmp / "cli_sd3")
    out = tmp / "cli_run"
    prompts = tmp / "cli_prompts.txt"
    prompts.write_text("a red cat\na blue dog\n")  # two prompts: each iteration meets the previous one's
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent / "tests"), os.environ.get("PYTHONPATH", "")]))
    base = [sys.executable, "-m", "flowpo", "train", "--preset", "flowpo_flash", "--out", str(out), "train.iterations=2",
            "model.kind=sd3", f"model.path={folder}", f"model.device={device}", "model.dtype=bf16",
            "model.gradient_checkpointing=true", "model.lora_rank=4", "model.lora_alpha=8", "model.resolution=16",
            f"model.max_sequence_length={T5_LENGTH}", "eval.every=1", "eval.prompts=2",
            "eval.samples_per_prompt=1", "eval.steps=3", "sample.steps=4", "sample.prompts_per_iteration=2",
            "sample.group_size=3", "sample.guidance=2.0", "reward.names=[tiny_pipelines:brightness_reward]",
            "plan.window_size=2", "advantage.substeps=2", "train.minibatches=1", "replay.rule=always",
            f"sample.prompts_file={prompts}",
            "log.progress=false",
            "train.checkpoint_every=1"]
    r1 = subprocess.run(base, env=env, capture_output=True, text=True)
    r2 = subprocess.run([sys.executable, "-m", "flowpo", "train", "--resume", str(out), "train.iterations=3"],
                        env=env, capture_output=True, text=True)
    lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
    n_train = sum('"reward_mean"' in x for x in lines)
    replayed = sum(json.loads(x).get("replay/admitted", 0) > 0 for x in lines)
    ok = r1.returncode == 0 and r2.returncode == 0 and n_train == 3
    if not ok:
        print(r1.stderr[-3000:], r2.stderr[-3000:], file=sys.stderr)
    return {"kind": "sd3", "preset": "flowpo_flash", "check": "flowpo train 2 it + --resume to 3 (bf16, eval, ckpt)",
            "value": float(n_train), "scale": float("nan"), "ok": ok,
            "detail": f"rc {r1.returncode}/{r2.returncode}, {n_train} training iterations logged, "
                      f"{replayed} with replayed rows"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/gpu_check")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--parts", default="parity,tiny")
    ap.add_argument("--presets", default="flow_grpo,dance_grpo,mix_grpo,mix_grpo_flash,op_grpo,stepwise_grpo,"
                                         "flowpo_flash")
    ap.add_argument("--tiny-presets", default="flow_grpo,mix_grpo_flash,op_grpo,stepwise_grpo,flowpo_flash")
    ap.add_argument("--kinds", default="sd3,flux,wan")
    ap.add_argument("--modes", default="bf16+ckpt",
                    help="tiny-pipeline training modes: dtype (bf16/fp32), +ckpt (gradient checkpointing), "
                         "+math (PyTorch's math attention kernel as a context around the iteration), +attn "
                         "(the same through the config: model.attention=math), e.g. bf16+ckpt,fp32,bf16+ckpt+attn")
    ap.add_argument("--cli", type=int, default=1, help="also run `flowpo train` + --resume on tiny SD3 (1/0)")
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--threads", type=int, default=4)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="flowpo-gpu-"))
    parts = args.parts.split(",")
    where = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    md = [f"command: {' '.join(sys.argv)}", f"device: {where}; torch {torch.__version__}", ""]
    failed = False
    if "tiny" in parts:
        rows = tiny(args.device, args.tiny_presets.split(","), tmp, args.kinds.split(","), args.modes.split(","))
        try:
            if args.cli:
                rows.append(cli_end_to_end(args.device, tmp))
        except Exception as e:
            traceback.print_exc()
            rows.append({"kind": "sd3", "preset": "flowpo_flash", "check": "flowpo train + --resume", "value": float("nan"),
                         "scale": float("nan"), "ok": False, "detail": f"{type(e).__name__}: {e}"})
        with open(out / "tiny.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["kind", "preset", "check", "value", "scale", "ok", "detail"])
            w.writeheader()
            w.writerows(rows)
        md += ["| kind | preset | check | value | scale | ok | detail |", "|---|---|---|---|---|---|---|"]
        md += [f"| {r['kind']} | {r['preset']} | {r['check']} | {r['value']:.4g} | {r['scale']:.4g} | {r['ok']} | "
               f"{r.get('detail', '')} |" for r in rows]
        failed |= not all(r["ok"] for r in rows)
        md.append("")
        (out / "gpu_check.md").write_text("\n".join(md) + "\n")  # kept if a later part is cut off
    if "parity" in parts:
        rows = parity(args.presets.split(","), args.device, args.iterations, tmp, args.threads)
        with open(out / "parity.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        md += ["| preset | quantity | cpu | device | abs diff | scale |", "|---|---|---|---|---|---|"]
        md += [f"| {r['preset']} | {r['what']} | {r['cpu']} | {r['device']} | {r['abs_diff']:.3g} | {r['scale']:.3g} |"
               for r in rows]
        failed |= any(r["what"] == "non-finite numbers on device" and r["abs_diff"] > 0 for r in rows)
        md.append("")
    (out / "gpu_check.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
