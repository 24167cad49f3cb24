"""Config errors: one clear line naming the key, the value and what is allowed."""
import subprocess
import sys

import pytest

from flowpo import config
from flowpo.config import ConfigError


def test_defaults_and_overrides():
    cfg = config.load(None, "mix_grpo", ["train.iterations=7", "reward.names=[digit_alignment,stroke_quality]",
                                         "reward.weights=[1.0,0.5]", "plan.truncate_sigma=0.2", "train.lr=1e-5"])
    assert cfg.train.iterations == 7 and cfg.plan.kind == "sliding_window" and cfg.preset == "mix_grpo"
    assert cfg.reward.names == ["digit_alignment", "stroke_quality"] and cfg.reward.weights == [1.0, 0.5]
    assert (cfg.plan.truncate, cfg.plan.truncate_at) == ("sigma", 0.2) and cfg.train.lr == 1e-5


@pytest.mark.parametrize("override,needle", [
    ("train.iteratoins=3", "did you mean 'train.iterations'"),
    ("sampel.steps=3", "did you mean 'sample'"),
    ("train.iterations=abc", "train.iterations='abc' is not an integer"),
    ("train.iterations=2.5", "is not an integer"),
    ("sample.kernel=flowgrpo", "did you mean 'flow_grpo'"),
    ("sample.steps=1", "sample.steps=1 is out of range; allowed: >= 2"),
    ("train.lr=0", "train.lr=0.0 is out of range; allowed: > 0"),
    ("reward.weights=[1,2]", "give one weight per reward"),
    ("log.progress=maybe", "is not a boolean"),
    ("train.iterations", "must look like key.path=value"),
    ("model.kind=sd3", "model.path is required"),
])
def test_bad_values_name_key_value_and_allowed(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("(", r"\(")):
        config.load(None, None, [override])


def test_unknown_preset_and_missing_file():
    with pytest.raises(ConfigError, match="did you mean 'flow_grpo'"):
        config.load(None, "flow_grpoo", [])
    with pytest.raises(ConfigError, match="does not exist"):
        config.load("/nonexistent.yaml", None, [])


def test_yaml_files_under_configs_load():
    from pathlib import Path

    files = sorted(Path(__file__).parent.parent.glob("configs/*.yaml"))
    assert files
    for f in files:
        try:
            config.load(str(f))
        except ConfigError as e:
            assert "model.path" in str(e) or "does not exist" in str(e), (f, e)


def test_cli_prints_one_line_no_traceback():
    p = subprocess.run([sys.executable, "-m", "flowpo", "train", "train.iteratoins=3"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in p.stderr
    assert "train.iteratoins" in lines[0] and "iterations" in lines[0]


def test_attention_kernel_switch_is_process_wide_and_validated():
    """model.attention=math turns the fused CUDA SDPA kernels off (flags readable on CPU builds too);
    'auto' leaves the flags alone; unknown values are refused by the config with the allowed list."""
    import torch

    from flowpo.parts import restore_attention, set_attention

    cuda = torch.backends.cuda
    saved = set_attention("math")
    try:
        assert cuda.math_sdp_enabled() and not (cuda.flash_sdp_enabled() or cuda.mem_efficient_sdp_enabled()
                                                or cuda.cudnn_sdp_enabled())
        assert set_attention("auto")["math"] and cuda.math_sdp_enabled() and not cuda.flash_sdp_enabled()  # unchanged
        set_attention("flash")
        assert cuda.flash_sdp_enabled() and not cuda.math_sdp_enabled()
    finally:
        restore_attention(saved)
    assert (cuda.math_sdp_enabled(), cuda.flash_sdp_enabled()) == (saved["math"], saved["flash"])
    with pytest.raises(config.ConfigError, match=r"model.attention='fast' is not allowed.*'math'"):
        config.load(None, "flow_grpo", ["model.attention=fast"])
    # the config's allowed values and the switch's kernels are one list
    import typing

    from flowpo.parts import ATTENTION_BACKENDS
    assert typing.get_args(typing.get_type_hints(config.ModelConfig)["attention"]) == ("auto", *ATTENTION_BACKENDS)


def test_window_size_is_checked_only_for_plans_with_a_window():
    from flowpo import config as cfgmod
    from flowpo.errors import ConfigError

    assert cfgmod.load(None, "flow_grpo", ["sample.steps=2"]).sample.steps == 2   # no window: T = 2 is fine
    with pytest.raises(ConfigError, match=r"plan.window_size=2 is out of range"):
        cfgmod.load(None, "mix_grpo", ["sample.steps=2"])
