"""End to end: the tiny SD3 pipeline trains 2 iterations with a real scorer class loaded from disk,
`pickscore` (a tiny CLIP folder) and `ocr` (the RapidOCR engine), options set from the command
line, prompts with metadata from a .jsonl file."""
from __future__ import annotations

import json

import pytest
import torch

from flowpo.cli import main
from tiny_pipelines import T5_LENGTH, save_tiny, tiny_sd3_pipeline
from tiny_rewards import tiny_clip_folder

RES = 32


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return save_tiny(tiny_sd3_pipeline(seed=0), tmp_path_factory.mktemp("tiny") / "sd3")


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _train(out, sd3, *extra):
    return main(["train", "--preset", "flow_grpo", "--out", str(out), "model.kind=sd3", f"model.path={sd3}",
                 "model.lora_rank=4", "model.lora_alpha=8", f"model.resolution={RES}",
                 f"model.max_sequence_length={T5_LENGTH}", "train.iterations=2", "eval.every=2", "eval.prompts=2",
                 "eval.samples_per_prompt=1", "eval.steps=3", "sample.steps=4", "sample.prompts_per_iteration=2",
                 "sample.group_size=2", "sample.guidance=2.0", "log.progress=false", "log.tensorboard=false",
                 "train.threads=1", *extra])


def _rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.ci
def test_sd3_trains_with_pickscore(tmp_path, sd3):
    clip = tiny_clip_folder(tmp_path / "pickscore")
    out = tmp_path / "run"
    assert _train(out, sd3, "reward.names=[pickscore]", f"reward.options.pickscore.path={clip}",
                  "reward.options.pickscore.scaling=raw", "reward.options.pickscore.device=cpu") == 0
    train = [r for r in _rows(out) if "reward_mean" in r]
    assert len(train) == 2 and all(r["reward/pickscore"] > 0 for r in train)
    assert train[0]["reward_std"] > 0  # the scorer tells samples apart: there is a signal
    import yaml

    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["reward"]["options"]["pickscore"]["path"] == clip  # options are part of the run's config


@pytest.mark.slow
@pytest.mark.ci
def test_sd3_trains_with_ocr_and_jsonl_prompts(tmp_path, sd3):
    pytest.importorskip("rapidocr")
    prompts = tmp_path / "text.jsonl"
    prompts.write_text('{"prompt": "a sign that says \\"open\\"", "tag": "sign"}\n'
                       '{"prompt": "a poster", "text": "flowpo", "tag": "poster"}\n')
    out = tmp_path / "run"
    assert _train(out, sd3, "reward.names=[ocr]", "reward.options.ocr.threads=1", f"sample.prompts_file={prompts}",
                  f"eval.prompts_file={prompts}") == 0
    rows = _rows(out)
    assert len([r for r in rows if "reward_mean" in r]) == 2
    evals = [json.loads(x) for x in (out / "evals" / "000002.jsonl").read_text().splitlines()]
    assert {r["metadata"]["tag"] for r in evals} == {"sign", "poster"}
    assert all(0.0 <= r["ocr"] <= 1.0 for r in evals) and "eval_tag/sign" in rows[-1]


def test_unknown_reward_option_from_the_command_line_is_one_line(tmp_path, capsys):
    clip = tiny_clip_folder(tmp_path / "clip")
    code = main(["train", "--out", str(tmp_path / "r"), "reward.names=[pickscore]",
                 f"reward.options.pickscore.path={clip}", "reward.options.pickscore.scalng=raw"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "reward.options.pickscore.scalng: reward 'pickscore' has no option 'scalng' (did you mean 'scaling'?)" in err
    assert not (tmp_path / "r").exists()
