"""Count the tensor → Python conversions (host syncs on a GPU) of one training iteration.

    python benchmarks/host_syncs.py --presets flow_grpo,op_grpo,stepwise_grpo,awm [key=value ...]

Every `Tensor.item / tolist / __float__ / __int__ / __bool__ / __index__` call waits for the
device when the tensor lives on a GPU, so their number on the hot path is the number of times the
host stalls the stream. On this CPU-only machine every conversion is counted, also those of
tensors that live on the CPU in a GPU run (rewards, group ids, masks kept on the host), so the
figures are an upper bound of the GPU's syncs. Printed per preset: conversions in the whole
iteration and inside the update (`Trainer._update`), after one warm-up iteration; the run's shape
(chunks × trained steps, optimizer steps) beside them. `update_flowpo` counts only what flowpo's own
code calls inside the update (conversions and `.cpu()` copies; not torch's, such as AdamW reading
its step counters, which stay on the host unless `capturable`): a GPU run's stalls are at most that. Works on any commit with
`flowpo.training.trainer.Trainer` (run it with PYTHONPATH pointing at another tree's src to
compare).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import sys
import tempfile

import torch

NAMES = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")


def _from_flowpo() -> bool:
    """Whether the conversion being counted was called by flowpo's own code (not by torch, e.g. the
    optimizer reading its step counters, which live on the host even in a GPU run)."""
    caller = sys._getframe(2).f_code.co_filename
    return f"{os.sep}flowpo{os.sep}" in caller and f"{os.sep}benchmarks{os.sep}" not in caller


@contextlib.contextmanager
def counting(counts: collections.Counter, label: str):
    """Count the conversions made inside the block under `label`, and under `label + "_flowpo"`
    those flowpo's code makes, with its `.cpu()` copies (each a device→host transfer on a GPU)."""
    originals = {n: getattr(torch.Tensor, n) for n in NAMES + ("cpu",)}

    def wrap(name, fn):
        def counted(self, *a, **k):
            if name != "cpu":
                counts[label] += 1
            if _from_flowpo():
                counts[label + "_flowpo"] += 1
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
            counts["update_flowpo"] += inner["update_flowpo"]
            return out

        tr._update = counted_update
        with counting(counts, "iteration"):
            rec = tr.train_iteration(1)
    return {"preset": preset, "iteration": counts["iteration"], "update": counts["update"],  # (iteration ⊇ update)
            "update_flowpo": counts["update_flowpo"],
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
