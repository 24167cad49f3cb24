"""Per-rank memory of sharded full fine-tuning (FSDP2 as flowpo's `Dist.wrap` shards it) at 1, 2
and 4 processes, on a random-weight SD3.5-Medium-shaped transformer at reduced depth.

    python benchmarks/fsdp_memory.py [--depth 3] [--worlds 1,2,4] [--out benchmarks/fsdp_memory.csv]

Each world size is one `torchrun --nproc_per_node=W` launch (gloo, CPU, 1 thread per process) of
this file with `--worker`. Every rank builds the transformer on the meta device (no full copy is
ever materialised), shards it with `flowpo.training.distributed._shard` (one FSDP2 unit per
transformer block, then the root; reshard after forward), allocates its shards, and runs 2 AdamW
steps (lr 1e-5) of a flow-matching-style loss on one 256-px sample (32×32 latent, 64 text tokens).
Reported per rank, after the second backward (gradients still held) and the step:

- params / grads / adam: bytes of this rank's local shards (DTensor.to_local), exact;
- P+G+O and its ratio to the 1-process total (the 1/W line is 1/W);
- peak RSS: the process's maximum resident set (ru_maxrss) minus the RSS after `import torch,
  diffusers` — shards plus activations, the all-gathered block of the moment, buffers (not
  sharded: SD3's positional table, here 64² positions instead of 384², the real size being
  384²×1536×4 B = 906 MB on every rank) and allocator slack.

SD3.5-Medium's widths are kept (1536 = 24 heads × 64, joint attention 4096, caption projection
1536, pooled 2048, qk rms_norm, dual attention in the first blocks); only the depth (24 blocks)
and the positional table are reduced.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(depth: int, out: str) -> None:
    import torch
    import torch.distributed as dist
    from diffusers import SD3Transformer2DModel

    base = rss_mb()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from flowpo.training.distributed import _shard

    with torch.device("meta"):
        model = SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=depth,
            attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
            caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=64,
            dual_attention_layers=tuple(range(min(depth, 13))), qk_norm="rms_norm")
    n_params = sum(p.numel() for p in model.parameters())
    _shard(model)
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(rank)
    with torch.no_grad():
        for p in model.parameters():
            p.to_local().normal_(0.0, 0.02, generator=g)  # random weights: the values do not matter here
        for b in model.buffers():
            b.zero_()
    for m in model.modules():
        if hasattr(m, "set_force_sum_reduction_for_comms"):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    x = torch.randn(1, 16, 32, 32, generator=g)
    text = torch.randn(1, 64, 4096, generator=g)
    pooled = torch.randn(1, 2048, generator=g)
    t = torch.full((1,), 500.0)
    times = []
    for _ in range(2):
        t0 = time.time()
        opt.zero_grad(set_to_none=False)
        v = model(hidden_states=x, timestep=t, encoder_hidden_states=text, pooled_projections=pooled,
                  return_dict=False)[0]
        ((v.float() - x) ** 2).mean().backward()
        grads = sum(p.grad.to_local().numel() * p.grad.element_size() for p in model.parameters()
                    if p.grad is not None)
        opt.step()
        times.append(time.time() - t0)

    def local_bytes(t):
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    params = sum(local_bytes(p) for p in model.parameters())
    adam = sum(local_bytes(v) for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    rec = {"world": world, "rank": rank, "params_total": n_params, "params_mb": params / 2**20,
           "grads_mb": grads / 2**20, "adam_mb": adam / 2**20, "pgo_mb": (params + grads + adam) / 2**20,
           "peak_rss_mb": peak, "step_s": times[-1]}
    recs = [None] * world
    dist.all_gather_object(recs, rec)
    if rank == 0:
        Path(out).write_text(json.dumps(recs))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--worlds", default="1,2,4")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "fsdp_memory.csv"))
    ap.add_argument("--worker", metavar="JSON", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.depth, args.worker)
        return
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for w in [int(x) for x in args.worlds.split(",")]:
            res = Path(tmp) / f"w{w}.json"
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={w}",
                            __file__, "--depth", str(args.depth), "--worker", str(res)], env=env, check=True)
            rows += json.loads(res.read_text())
    one = [r for r in rows if r["world"] == 1]
    ref = one[0]["pgo_mb"] if one else None
    fields = ["world", "rank", "params_total", "params_mb", "grads_mb", "adam_mb", "pgo_mb", "pgo_vs_1proc",
              "ideal_1_over_w", "peak_rss_mb", "step_s"]
    for r in rows:
        r["pgo_vs_1proc"] = r["pgo_mb"] / ref if ref else float("nan")
        r["ideal_1_over_w"] = 1.0 / r["world"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=fields)
        wr.writeheader()
        for r in rows:
            wr.writerow({k: (round(r[k], 4) if isinstance(r[k], float) else r[k]) for k in fields})
    print(f"SD3.5-M-shaped transformer, depth {args.depth}: {rows[0]['params_total'] / 1e6:.1f} M parameters")
    print("| W | rank | params MB | grads MB | AdamW MB | P+G+O MB | ÷ 1-process | 1/W | peak RSS MB | s/step |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['world']} | {r['rank']} | {r['params_mb']:.0f} | {r['grads_mb']:.0f} | {r['adam_mb']:.0f} | "
              f"{r['pgo_mb']:.0f} | {r['pgo_vs_1proc']:.3f} | {r['ideal_1_over_w']:.3f} | {r['peak_rss_mb']:.0f} | "
              f"{r['step_s']:.1f} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
