"""Count the tensor → Python conversions (host syncs on a GPU) of one training iteration.

    python benchmarks/host_syncs.py --presets flow_grpo,op_grpo,stepwise_grpo,awm [key=value ...]

Every `Tensor.item / tolist / __float__ / __int__ / __bool__ / __index__` call waits for the
device when the tensor lives on a GPU, so their number on the hot path is the number of times the
host stalls the stream. On this CPU-only machine every conversion is counted, also those of
tensors that live on the CPU in a GPU run (rewards, group ids, masks kept on the host), so the
figures are an upper bound of the GPU's syncs. Printed per preset: conversions in the whole
iteration and inside the update (`Trainer._update`), after one warm-up iteration; the run's shape
(chunks × trained steps, optimizer steps) beside them. Works on any commit with
`flowpo.training.trainer.Trainer` (run it with PYTHONPATH pointing at another tree's src to
compare).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import tempfile

import torch

NAMES = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")


@contextlib.contextmanager
def counting(counts: collections.Counter, label: str):
    """Count the conversions made inside the block under `label`."""
    originals = {n: getattr(torch.Tensor, n) for n in NAMES}

    def wrap(name, fn):
        def counted(self, *a, **k):
            counts[label] += 1
            return fn(self, *a, **k)
        return counted

    for n, fn in originals.items():
        setattr(torch.Tensor, n, wrap(n, fn))
    try:
        yield counts
    finally:
        for n, fn in originals.items():
            setattr(torch.Tensor, n, fn)


def measure(preset: str, overrides: list[str]) -> dict:
    from flowpo import config
    from flowpo.training.trainer import Trainer

    cfg = config.load(None, preset, ["train.iterations=2", "eval.every=0", "eval.prompts=4", "log.progress=false",
                                     "log.tensorboard=false", "log.grids=false", "train.threads=1", *overrides])
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(cfg, tmp)
        tr.train_iteration(0)
        tr.iteration = 1
        counts: collections.Counter = collections.Counter()
        update = tr._update

        def counted_update(b):
            inner: collections.Counter = collections.Counter()
            with counting(inner, "update"):
                out = update(b)
            counts["update"] += inner["update"]
            return out

        tr._update = counted_update
        with counting(counts, "iteration"):
            rec = tr.train_iteration(1)
    return {"preset": preset, "iteration": counts["iteration"], "update": counts["update"],  # (iteration ⊇ update)
            "optimizer_steps": rec.get("train/optimizer_steps"), "transitions": rec.get("stats/transitions")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default="flow_grpo,op_grpo,stepwise_grpo,awm")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    for p in args.presets.split(","):
        print(json.dumps(measure(p, args.overrides)), flush=True)


if __name__ == "__main__":
    main()
