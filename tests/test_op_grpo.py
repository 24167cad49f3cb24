"""OP-GRPO: replay off equals Flow-GRPO; importance weights; replayed rows enter the update."""
import torch

from flowpo import config
from flowpo.buffer import importance_weights
from flowpo.training.trainer import Trainer


def _weights(tr):
    return {k: v.clone() for k, v in tr.policy.trainable_state_dict().items()}


def test_replay_with_k0_equals_flow_grpo(tmp_path, tiny):
    a = Trainer(config.load(None, "flow_grpo", tiny + ["train.iterations=2"]), tmp_path / "a")
    b = Trainer(config.load(None, "op_grpo", tiny + ["train.iterations=2", "replay.k=0"]), tmp_path / "b")
    for it in range(2):
        ra, rb = a.train_iteration(it), b.train_iteration(it)
        assert ra["reward_mean"] == rb["reward_mean"]
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_importance_weight_is_one_when_behaviour_is_current():
    kept = torch.tensor([[True, True, False], [True, False, False]])
    lp = torch.randn(2, 3)
    for corr in ("sequence", "per_step"):
        for form in ("product", "geomean"):
            w, st = importance_weights(lp, lp.clone(), kept, correction=corr, form=form, cap=2.0)
            assert torch.equal(w, torch.ones_like(w)) and st["replay/ess"] == 2.0


def test_importance_weight_forms_by_hand():
    kept = torch.tensor([[True, True, False]])
    pi_old = torch.tensor([[0.0, 0.0, 5.0]])
    beta = torch.tensor([[-0.2, -0.4, 0.0]])   # log π_old − log β = 0.2, 0.4 on kept steps
    w, _ = importance_weights(pi_old, beta, kept, correction="sequence", form="product")
    assert torch.allclose(w[0, 0], torch.exp(torch.tensor(0.6)))
    w, _ = importance_weights(pi_old, beta, kept, correction="sequence", form="geomean")
    assert torch.allclose(w[0, 0], torch.exp(torch.tensor(0.3)))
    w, _ = importance_weights(pi_old, beta, kept, correction="per_step")
    assert torch.allclose(w[0, :2], torch.exp(torch.tensor([0.2, 0.4])))
    w, st = importance_weights(pi_old, beta, kept, correction="sequence", form="geomean", cap=1.2)
    assert abs(float(w[0, 0]) - 1.2) < 1e-6 and st["replay/capped_frac"] == 1.0


def test_replayed_rows_join_the_update(tmp_path, tiny):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten 7\n")  # one prompt: every group finds the buffer's entry
    cfg = config.load(None, "op_grpo", tiny + ["replay.rule=always", "train.minibatches=1", "train.iterations=3",
                                               f"sample.prompts_file={prompts}", "replay.truncate_sigma=0.7",
                                               "replay.capacity_per_prompt=2", "replay.store=best",
                                               "replay.fill=fixed", "replay.tail=drop"])
    tr = Trainer(cfg, tmp_path / "r")
    r0 = tr.train_iteration(0)
    assert r0["replay/admitted"] == 0 and r0["replay/entries"] == 2  # capacity 2 per prompt
    assert r0["stats/transitions"] == 2 * 3 * 3  # 2 groups × (G−k=3) fresh × 3 trained steps
    r1 = tr.train_iteration(1)
    # both groups get the best replayed trajectory; its kept steps are those with σ_t ≥ 0.7
    kept = int((tr.sigmas[:3] >= 0.7).sum())
    assert r1["replay/admitted"] == 2
    assert r1["stats/transitions"] == 2 * 3 * 3 + 2 * kept
    assert r1["replay/w_mean"] > 0 and r1["replay/ess"] > 0 and r1["replay/bytes_per_trajectory"] > 0


def test_resume_continues_with_the_same_buffer(tmp_path, tiny):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten 7\nthe digit two\n")
    base = [x for x in tiny if not x.startswith("train.iterations")] + [
        "replay.rule=always", f"sample.prompts_file={prompts}"]
    full = Trainer(config.load(None, "op_grpo", base + ["train.iterations=3"]), tmp_path / "full")
    full.run()
    part = Trainer(config.load(None, "op_grpo", base + ["train.iterations=2"]), tmp_path / "part")
    part.run()
    cfg = config.load(str(tmp_path / "part" / "config.yaml"), None, ["train.iterations=3"], keep_resolved=True)
    resumed = Trainer(cfg, tmp_path / "part", resume=True)
    assert len(resumed.buffer) == len(part.buffer) > 0
    for p, lst in part.buffer.entries.items():
        for a, b in zip(lst, resumed.buffer.entries[p]):
            assert a.reward == b.reward and a.version == b.version and torch.equal(a.x, b.x)
    resumed.run()
    wa, wb = _weights(full), _weights(resumed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_regenerated_tail_is_scored_with_the_current_policy(tmp_path, tiny):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten 7\n")
    cfg = config.load(None, "op_grpo", tiny + ["replay.rule=always", "train.minibatches=1", f"sample.prompts_file={prompts}",
                                               "replay.truncate_sigma=0.8", "replay.tail=regenerate"])
    tr = Trainer(cfg, tmp_path / "r")
    tr.train_iteration(0)
    entry = tr.buffer.best("a handwritten 7", 1, 1)[0]
    kept = entry.steps.tolist()
    assert kept == [t for t in range(3) if float(tr.sigmas[t]) >= 0.8] and len(kept) < 3
    r1 = tr.train_iteration(1)
    c = kept[-1] + 1  # the regenerated tail runs the T − c remaining grid steps for each admitted row
    assert r1["replay/admitted"] == 2 and r1["replay/regenerate_nfe"] == 2 * (4 - c)
    assert entry.reward_raw.shape == (1,)  # the stored trajectory is unchanged


def test_buffer_truncation_by_fraction():
    from flowpo.buffer import ReplayBuffer
    from flowpo.schedule import sigmas

    buf = ReplayBuffer(sigmas(10), truncate_fraction=0.3)
    train = torch.ones(10, dtype=torch.bool)
    train[-1] = False
    assert buf.kept_steps(train).tolist() == list(range(7))  # the last round(0.3·10) = 3 steps dropped
