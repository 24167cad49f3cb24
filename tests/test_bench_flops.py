"""benchmarks/real_shapes.py's FLOP probe and MFU arithmetic (issue 20, item 5): exact counts on
layers whose FLOPs are known in closed form."""
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
real_shapes = pytest.importorskip("real_shapes")


class _Why:
    stack = ["update"]


def test_probe_counts_one_forward_per_row_linear_and_cpu_attention():
    real_shapes._register_cpu_attention_flops()
    lin = torch.nn.Linear(8, 6)
    b, h, s, d = 3, 2, 5, 4

    def fwd(x, q):
        return lin(x), torch.nn.functional.scaled_dot_product_attention(q, q, q)

    probe = real_shapes.FlopProbe(_Why())
    wrapped = probe.wrap(fwd, lambda a, k: a[0].shape[0])
    x, q = torch.randn(b, 8), torch.randn(b, h, s, d)
    wrapped(x, q)  # not armed: nothing counted
    assert math.isnan(probe.per_row)
    probe.armed = True
    out = wrapped(x, q)
    assert torch.equal(out[0], lin(x))
    # Linear: 2·in·out per row; attention Q·Kᵀ and P·V: 2·h·s·s·d each, per row
    assert probe.per_row == 2 * 8 * 6 + 4 * h * s * s * d
    assert not probe.armed  # one call only
    probe.per_row = -1.0
    wrapped(x, q)
    assert probe.per_row == -1.0


def test_mfu_lora_and_full():
    r = {"update_rows": 10, "update_fwd_s": 1.0, "update_bwd_s": 1.0, "update_s": 4.0, "rollout_rows": 20,
         "rollout_fwd_s": 2.0}
    lora = real_shapes._mfu(r, 1e12, "lora", 10.0)  # 10 rows × 1 TFLOP, backward 1×: 20 TFLOP
    assert lora["update_model_tflop"] == pytest.approx(20.0)
    assert lora["update_mfu"] == pytest.approx(20 / (4 * 10))
    assert lora["update_transformer_mfu"] == pytest.approx(20 / (2 * 10))
    assert lora["rollout_mfu"] == pytest.approx(20 / (2 * 10))
    full = real_shapes._mfu(r, 1e12, "full", 10.0)
    assert full["update_model_tflop"] == pytest.approx(30.0)
    assert math.isnan(real_shapes._mfu(r, 1e12, "lora", float("nan"))["update_mfu"])
