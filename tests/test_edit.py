"""Editing as a task: source images named by .jsonl prompt rows (checked, resolved, one-line
errors naming file and row), kept in metadata through the rollout, the rewards, the replay buffer
and the evaluation records; the `image_consistency` edit scorer on a tiny CLIP, against the
transformers PIL reference path, alone and combined with a text-image reward."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from flowpo import config
from flowpo.errors import ConfigError
from flowpo.policy.edit import encode_rows, row_images
from flowpo.prompts import read_prompt_file
from flowpo.rewards import RewardSet, get_scorer
from tiny_edit_pipelines import write_source_images
from tiny_rewards import tiny_clip_folder


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return tiny_clip_folder(tmp_path_factory.mktemp("clip") / "clip", image_size=32)


@pytest.fixture
def edits(tmp_path):
    """A prompts file in tmp_path/data naming source images under tmp_path/data/img."""
    names = write_source_images(tmp_path / "data" / "img", n=2, size=(24, 20))
    return _jsonl(tmp_path / "data" / "edits.jsonl", [
        {"prompt": "make it red", "image": f"img/{names[0]}", "tag": "color"},
        {"prompt": "add a dog", "images": [f"img/{names[1]}", f"img/{names[0]}"]},
        {"prompt": "no source here"}])


def test_source_images_are_resolved_checked_and_kept_in_metadata(edits, tmp_path):
    ps = read_prompt_file(str(edits), "sample.prompts_file")
    root = (tmp_path / "data" / "img").resolve()
    assert ps.meta[0] == {"images": [str(root / "src0.png")], "tag": "color"}  # `image` → `images` (a list)
    assert ps.meta[1] == {"images": [str(root / "src1.png"), str(root / "src0.png")]}
    assert ps.meta[2] == {}
    assert row_images(ps.meta[:2], 2, "k") == [(str(root / "src0.png"),), (str(root / "src1.png"), str(root / "src0.png"))]
    with pytest.raises(ConfigError, match=r"'k' edits images, but 1 of 3 prompt rows name no source image"):
        row_images(ps.meta, 3, "k")


@pytest.mark.parametrize("row,words", [
    ({"prompt": "p", "image": "img/missing.png"}, "line 2: source image 'img/missing.png' \\(.*missing.png\\) does not exist"),
    ({"prompt": "p", "image": "notes.txt"}, "line 2: source image 'notes.txt' .* does not open as an image"),
    ({"prompt": "p", "image": "img/src0.png", "images": ["img/src0.png"]}, "line 2 has both 'image' and 'images'"),
    ({"prompt": "p", "images": []}, "line 2: images=\\[\\] must be a path"),
    ({"prompt": "p", "image": 3}, "line 2: image=3 must be a path"),
])
def test_bad_source_image_is_one_line_naming_file_and_row(edits, tmp_path, capsys, row, words):
    from conftest import one_line

    from flowpo.cli import main

    (tmp_path / "data" / "notes.txt").write_text("not an image")
    f = _jsonl(tmp_path / "data" / "bad.jsonl", [{"prompt": "ok"}, row])
    with pytest.raises(ConfigError, match=words):
        read_prompt_file(str(f), "sample.prompts_file")
    code = main(["train", "--out", str(tmp_path / "run"), "train.iterations=1", f"sample.prompts_file={f}"])
    assert code == 2 and str(f) in one_line(capsys.readouterr().err)


class _EditingStub:
    """An editing policy's encode_prompts, recording what it was handed."""

    edits, model_kind = True, "stub"

    def __init__(self):
        self.calls = []

    def encode_prompts(self, prompts, images=None):
        self.calls.append((list(prompts), images))
        return {"x": torch.zeros(len(prompts), 1)}


def test_encode_rows_hands_images_only_to_editing_policies(edits):
    ps = read_prompt_file(str(edits), "sample.prompts_file")
    stub = _EditingStub()
    encode_rows(stub, ps.texts[:2], ps.meta[:2])
    assert stub.calls == [(ps.texts[:2], [tuple(m["images"]) for m in ps.meta[:2]])]

    class Plain:
        def encode_prompts(self, prompts):
            return {"x": torch.zeros(len(prompts), 1)}

    assert encode_rows(Plain(), ps.texts, ps.meta)["x"].shape == (3, 1)  # a text-to-image policy ignores them


def _pil_reference(clip_dir, images):
    """transformers' path: uint8 PIL images through CLIPProcessor, CLIPModel → normalised features."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval()
    proc = CLIPProcessor.from_pretrained(clip_dir, local_files_only=True)
    with torch.no_grad():
        f = model.get_image_features(pixel_values=proc(images=images, return_tensors="pt")["pixel_values"])
    return torch.nn.functional.normalize(getattr(f, "pooler_output", f), dim=-1)


def test_image_consistency_is_clip_image_similarity_with_the_source(edits, clip_dir):
    from flowpo.rewards.edit import read_image

    ps = read_prompt_file(str(edits), "sample.prompts_file")
    src0, src1 = ps.meta[1]["images"][1], ps.meta[1]["images"][0]
    scorer = get_scorer("image_consistency", path=clip_dir, device="cpu")
    same = torch.stack([read_image(src0), read_image(src1)])                  # the sources themselves
    meta = [{"images": [src0]}, {"images": [src1]}]
    torch.testing.assert_close(scorer(same, ["a", "b"], meta), torch.ones(2), atol=1e-5, rtol=0)
    swapped = scorer(same, ["a", "b"], meta[::-1])
    ref = _pil_reference(clip_dir, [Image.open(src0).convert("RGB"), Image.open(src1).convert("RGB")])
    expected = (ref[0] @ ref[1]).item()
    assert swapped[0].item() < 0.999 and swapped[0].item() == pytest.approx(expected, abs=2e-3)
    assert swapped[1].item() == pytest.approx(expected, abs=2e-3)
    both = get_scorer("image_consistency", path=clip_dir, device="cpu", source="mean")
    assert both(same[:1], ["a"], [ps.meta[1]]).item() == pytest.approx((1 + expected) / 2, abs=2e-3)
    with pytest.raises(ConfigError, match="row 0 has no source image"):
        scorer(same[:1], ["a"], [{}])
    with pytest.raises(ConfigError, match="source='last' is unknown"):
        get_scorer("image_consistency", path=clip_dir, device="cpu", source="last")
    with pytest.raises(ConfigError, match="scaling='nope' is unknown"):
        get_scorer("image_consistency", path=clip_dir, scaling="nope")


def test_image_consistency_combines_with_a_text_image_reward(edits, clip_dir):
    from flowpo.rewards.edit import read_image

    ps = read_prompt_file(str(edits), "sample.prompts_file")
    rs = RewardSet(["pickscore", "image_consistency"], [1.0, 0.5],
                   options={"pickscore": {"path": clip_dir, "device": "cpu", "scaling": "raw"},
                            "image_consistency": {"path": clip_dir, "device": "cpu"}})
    images = torch.stack([read_image(ps.meta[0]["images"][0])] * 2)
    raw = rs.score(images, ps.texts[:2], ps.meta[:2])                       # [2, 2]
    comb = rs.combine(raw)
    torch.testing.assert_close(comb, raw[:, 0] + 0.5 * raw[:, 1])
    assert raw[0, 1].item() == pytest.approx(1.0, abs=1e-5) and raw[1, 1].item() < 0.999


def test_source_images_reach_rewards_replay_and_eval_records(tmp_path, tiny, monkeypatch):
    """A text-to-image policy (the embedded model) trains on rows with source images: the rewards
    get them in metadata, the replay buffer and the evaluation records keep them."""
    names = write_source_images(tmp_path / "img", n=2, size=(16, 16))
    prompts = _jsonl(tmp_path / "p.jsonl", [{"prompt": f"a handwritten {d}", "image": f"img/{names[d % 2]}"}
                                            for d in range(4)])
    (tmp_path / "seen_reward.py").write_text(
        "import torch\nSEEN = []\n"
        "def seen(images, prompts, metadata):\n"
        "    SEEN.extend(m['images'][0] for m in metadata)\n"
        "    return images.mean(dim=(1, 2, 3))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import seen_reward

    from flowpo.training.trainer import Trainer

    args = tiny + ["reward.names=[seen_reward:seen]", f"sample.prompts_file={prompts}",
                   f"eval.prompts_file={prompts}", "replay.rule=always", "train.iterations=2"]
    tr = Trainer(config.load(None, "op_grpo", args), tmp_path / "r")
    tr.run()
    srcs = {str((tmp_path / "img" / n).resolve()) for n in names}
    assert seen_reward.SEEN and set(seen_reward.SEEN) <= srcs
    entries = [e for lst in tr.parts.replay.buffer.entries.values() for e in lst]
    assert entries and all(e.meta["images"][0] in srcs for e in entries)
    recs = [json.loads(x) for x in (tmp_path / "r" / "evals" / "000002.jsonl").read_text().splitlines()]
    assert recs and all(r["metadata"]["images"][0] in srcs for r in recs)
