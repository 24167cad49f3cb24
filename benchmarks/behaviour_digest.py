"""Digest of the trained weights after a few iterations of every preset (behaviour preservation).

    python benchmarks/behaviour_digest.py --out digests.json [--iterations 3] [--presets a,b]

Runs each preset on the embedded default with seed 0 from the shipped base weights (or --weights
FILE), and writes {preset: sha256 of the trainable tensors, in name order}. Run it on two commits
and compare the files: equal digests mean bit-identical weights.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import tempfile

import torch


def digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--presets", default="")
    ap.add_argument("--weights", default=None, help="base weights file (default: the shipped one)")
    args = ap.parse_args()
    from flowpo import config
    from flowpo.presets import PRESETS

    names = [n for n in args.presets.split(",") if n] or list(PRESETS)
    out = {}
    for name in names:
        ov = [f"train.iterations={args.iterations}", "train.seed=0", "eval.every=0", "eval.prompts=4",
              "log.progress=false", "log.tensorboard=false", "log.grids=false", "train.threads=1"]
        if args.weights:
            ov.append(f"model.path={args.weights}")
        cfg = config.load(None, name, ov)
        with tempfile.TemporaryDirectory() as tmp:
            try:
                from flowpo.training.trainer import Trainer
            except ImportError:  # before the redesign
                from flowpo.trainer import Trainer
            tr = Trainer(cfg, tmp)
            tr.run()
            out[name] = digest(tr.policy.trainable_state_dict())
        print(name, out[name], flush=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
