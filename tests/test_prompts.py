"""Prompt sets with metadata: .txt and .jsonl files, one-line errors naming the file and line, and
the metadata reaching the rewards (training, stepwise estimates, regenerated replay tails), the
replay buffer (also through a checkpoint) and the evaluation records."""
from __future__ import annotations

import json

import pytest
import torch

from flowpo import config
from flowpo.cli import main
from flowpo.errors import ConfigError
from flowpo.prompts import PromptSet, read_prompt_file
from flowpo.training.trainer import Trainer


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_txt_and_jsonl(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a cat\n\n  a dog  \n")
    ps = read_prompt_file(str(txt), "sample.prompts_file")
    assert ps.texts == ["a cat", "a dog"] and ps.meta == [{}, {}]
    geneval = _jsonl(tmp_path / "g.jsonl", [
        {"tag": "counting", "include": [{"class": "cat", "count": 2}], "prompt": "a photo of two cats"},
        {"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "red"}], "prompt": "a red dog"}])
    ps = read_prompt_file(str(geneval), "eval.prompts_file")
    assert ps.texts == ["a photo of two cats", "a red dog"]
    assert ps.meta[0] == {"tag": "counting", "include": [{"class": "cat", "count": 2}]}
    sub = ps.take(torch.tensor([1, 1, 0]))
    assert sub.texts == ["a red dog", "a red dog", "a photo of two cats"] and sub.meta[2]["tag"] == "counting"


@pytest.mark.parametrize("content,words", [
    ('{"prompt": "ok"}\n{"prompt": "broken"\n', "line 2 is not valid JSON"),
    ('{"prompt": "ok"}\n["a list"]\n', "line 2 is a JSON list, not an object"),
    ('{"prompt": "ok"}\n\n{"text": "no prompt"}\n', "line 3 has no non-empty string field 'prompt' (fields: ['text'])"),
    ('{"prompt": ""}\n', "line 1 has no non-empty string field 'prompt'"),
    ("\n\n", "holds no prompts"),
])
def test_malformed_jsonl_is_one_line_naming_file_and_line(tmp_path, capsys, content, words):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(ConfigError, match=None) as e:
        read_prompt_file(str(f), "sample.prompts_file")
    assert words in str(e.value) and str(f) in str(e.value)
    code = main(["train", "--out", str(tmp_path / "run"), "train.iterations=1", f"sample.prompts_file={f}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and words in err and not (tmp_path / "run").exists()


def test_missing_file_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="does not exist; give a .txt file"):
        read_prompt_file(str(tmp_path / "nope.jsonl"), "eval.prompts_file")
    with pytest.raises(ConfigError, match="is a directory"):
        read_prompt_file(str(tmp_path), "eval.prompts_file")


SCORER = '''
import torch
SEEN = []
def tagged(images, prompts, metadata):
    """1 for the digit the metadata asks for (the digit classifier's argmax), else 0; records what it saw."""
    from flowpo.embedded.rewards import _classifier, _grey16
    SEEN.extend(zip(prompts, [dict(m) for m in metadata]))
    pred = _classifier()(_grey16(images)).argmax(-1)
    want = torch.tensor([int(m["digit"]) for m in metadata])
    return (pred == want).float() + 0.01 * images.mean(dim=(1, 2, 3))
'''


@pytest.fixture
def meta_scorer(tmp_path, monkeypatch):
    (tmp_path / "meta_reward.py").write_text(SCORER)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    import meta_reward

    importlib.reload(meta_reward)
    return meta_reward


def _digit_prompts(tmp_path, n=4):
    return _jsonl(tmp_path / "digits.jsonl", [{"prompt": f"a handwritten {d}", "digit": d, "tag": f"d{d % 2}"}
                                               for d in range(n)])


def test_metadata_reaches_rewards_buffer_and_eval_records(tmp_path, tiny, meta_scorer):
    prompts = _digit_prompts(tmp_path)
    args = tiny + ["reward.names=[meta_reward:tagged]", f"sample.prompts_file={prompts}",
                   f"eval.prompts_file={prompts}", "replay.rule=always", "replay.tail=regenerate",
                   "replay.truncate=sigma", "replay.truncate_at=0.7", "train.iterations=3"]
    tr = Trainer(config.load(None, "op_grpo", args), tmp_path / "r")
    tr.run()
    seen = meta_scorer.SEEN
    assert seen and all(m["digit"] == int(p.split()[-1]) for p, m in seen)  # every call got its own metadata
    entries = [e for lst in tr.parts.replay.buffer.entries.values() for e in lst]
    assert entries and all(e.meta["digit"] == int(e.prompt.split()[-1]) for e in entries)
    # the buffer's metadata survives the checkpoint
    from flowpo.buffer import ReplayBuffer

    tensors, meta = tr.parts.replay.buffer.state_dict()
    again = ReplayBuffer(tr.sigmas)
    again.load_state_dict(tensors, json.loads(json.dumps(meta)))
    assert [e.meta for lst in again.entries.values() for e in lst] == [e.meta for e in entries]
    # eval records: one line per sample with its prompt, metadata and rewards; per-tag means logged
    recs = [json.loads(x) for x in (tmp_path / "r" / "evals" / "000003.jsonl").read_text().splitlines()]
    assert len(recs) == 4 and {r["metadata"]["tag"] for r in recs} == {"d0", "d1"}
    assert all(r["prompt"] == f"a handwritten {r['metadata']['digit']}" for r in recs)
    last = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()][-1]
    by_tag = {t: [r["reward"] for r in recs if r["metadata"]["tag"] == t] for t in ("d0", "d1")}
    for t, vals in by_tag.items():
        assert last[f"eval_tag/{t}"] == pytest.approx(sum(vals) / len(vals))


def test_stepwise_estimates_get_metadata(tmp_path, tiny, meta_scorer):
    prompts = _digit_prompts(tmp_path)
    tr = Trainer(config.load(None, "stepwise_grpo", tiny + ["reward.names=[meta_reward:tagged]",
                                                            f"sample.prompts_file={prompts}"]), tmp_path / "s")
    meta_scorer.SEEN.clear()
    tr.train_iteration(0)
    # the final samples plus the Tweedie estimates of every trained step were scored with metadata
    assert len(meta_scorer.SEEN) > 8 and all(m["digit"] == int(p.split()[-1]) for p, m in meta_scorer.SEEN)


def test_promptset_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        PromptSet(["a", "b"], [{}])


def test_a_byte_order_mark_is_not_part_of_the_first_prompt(tmp_path):
    from flowpo.prompts import read_prompt_file

    f = tmp_path / "p.txt"
    f.write_bytes("\ufeffa handwritten 7\nthe digit two\n".encode("utf-8"))
    assert read_prompt_file(str(f), "sample.prompts_file").texts == ["a handwritten 7", "the digit two"]
    j = tmp_path / "p.jsonl"
    j.write_bytes('\ufeff{"prompt": "a 3"}\n'.encode("utf-8"))
    assert read_prompt_file(str(j), "eval.prompts_file").texts == ["a 3"]
