"""OP-GRPO: replay off equals Flow-GRPO; importance weights; replayed rows enter the update."""
import torch

from flowpo import config
from flowpo.importance import importance_weights
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
                                               f"sample.prompts_file={prompts}", "replay.truncate=sigma", "replay.truncate_at=0.7",
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
    buf, again = part.parts.replay.buffer, resumed.parts.replay.buffer
    assert len(again) == len(buf) > 0
    for p, lst in buf.entries.items():
        for a, b in zip(lst, again.entries[p]):
            assert a.reward == b.reward and a.version == b.version and torch.equal(a.x, b.x)
    resumed.run()
    wa, wb = _weights(full), _weights(resumed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_regenerated_tail_is_scored_with_the_current_policy(tmp_path, tiny):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten 7\n")
    cfg = config.load(None, "op_grpo", tiny + ["replay.rule=always", "train.minibatches=1", f"sample.prompts_file={prompts}",
                                               "replay.truncate=sigma", "replay.truncate_at=0.8", "replay.tail=regenerate"])
    tr = Trainer(cfg, tmp_path / "r")
    tr.train_iteration(0)
    entry = tr.parts.replay.buffer.best("a handwritten 7", 1, 1)[0]
    kept = entry.steps.tolist()
    assert kept == [t for t in range(3) if float(tr.sigmas[t]) >= 0.8] and len(kept) < 3
    r1 = tr.train_iteration(1)
    c = kept[-1] + 1  # the regenerated tail runs the T − c remaining grid steps for each admitted row
    assert r1["replay/admitted"] == 2 and r1["replay/regenerate_nfe"] == 2 * (4 - c)
    assert entry.reward_raw.shape == (1,)  # the stored trajectory is unchanged


def test_buffer_truncation_by_fraction():
    from flowpo.buffer import ReplayBuffer
    from flowpo.schedule import sigmas

    from flowpo.plans import truncation_keep

    buf = ReplayBuffer(sigmas(10), truncation=truncation_keep(sigmas(10), fraction=0.3))
    train = torch.ones(10, dtype=torch.bool)
    train[-1] = False
    assert buf.kept_steps(train).tolist() == list(range(7))  # the last round(0.3·10) = 3 steps dropped


# ----------------------------------------------------------------------------- the paper's groups
def _buffer(**kw):
    from flowpo.buffer import ReplayBuffer
    from flowpo.schedule import sigmas as make_sigmas

    return ReplayBuffer(make_sigmas(4, 3.0), **kw)


def _offer(buf, it, prompts, rewards, metadata=None, eligible=None):
    from flowpo.trajectory import Trajectory

    n, T = len(prompts), 4
    r = torch.tensor(rewards)
    rows = Trajectory(prompts=prompts, metadata=metadata or [{}] * n, versions=torch.full((n,), it),
                      states=torch.randn(n, T + 1, 2), train=torch.ones(n, T, dtype=torch.bool),
                      log_probs=torch.zeros(n, T), final=torch.zeros(n, 2), raw=r[:, None])
    buf.add(rows, r, eligible=eligible)


def test_age_in_visits_keeps_a_rarely_drawn_prompts_entry():
    by_visit, by_iter = _buffer(max_age=2, age_unit="visits"), _buffer(max_age=2)
    for b in (by_visit, by_iter):
        b.visit(["a", "b"])
        _offer(b, 0, ["a", "b"], [1.0, 1.0])
    for it in range(1, 6):             # only "b" is drawn for 5 iterations
        for b in (by_visit, by_iter):
            b.visit(["b"])
            b.expire(it)
    assert [k for k in by_visit.entries] == ["a"]   # "a" was not visited: its entry has age 0
    assert by_iter.entries == {}                    # in iterations, both aged out
    for _ in range(3):
        by_visit.visit(["a"])
    assert by_visit.entries == {}                   # three visits later "a"'s entry is 3 > 2 old


def test_fill_on_hit_gives_groups_without_an_entry_all_fresh_samples():
    from flowpo.prompts import PromptSet
    from flowpo.replay import OPReplay
    from flowpo.rewards import RewardSet
    from flowpo.schedule import sigmas as make_sigmas

    cfg = config.load(None, "op_grpo", ["sample.steps=4"])
    assert cfg.replay.fill == "on_hit" and cfg.replay.rule == "always" and cfg.replay.tail == "regenerate"
    rep = OPReplay(cfg, make_sigmas(4, 3.0), policy=None, rewards=RewardSet(["digit_alignment"], [1.0]),
                   dist=None, device="cpu")
    _offer(rep.buffer, 0, ["a handwritten 1"], [1.0])
    heads = PromptSet(["a handwritten 1", "a handwritten 2"])
    counts = rep.fresh_counts(1, heads, G=8)
    assert counts.tolist() == [7, 8]       # G − 1 fresh + 1 replayed where the prompt has an entry, else G
    rep.fill_all_misses = False            # replay.fill=fixed
    assert rep.fresh_counts(2, heads, G=8).tolist() == [7, 7]


def test_store_above_mean_and_metadata_keyed_entries():
    from flowpo.buffer import prompt_key

    b = _buffer(capacity_per_prompt=1)
    _offer(b, 0, ["p", "p", "q", "q"], [0.0, 1.0, 0.5, 0.5], eligible=torch.tensor([False, True, False, False]))
    assert list(b.entries) == ["p"] and b.entries["p"][0].reward == 1.0   # q's group had no spread: nothing kept
    # the same text with other metadata (another OCR target) is another prompt
    _offer(b, 1, ["sign", "sign"], [1.0, 1.0], metadata=[{"text": "A"}, {"text": "B"}])
    assert {prompt_key("sign", {"text": "A"}), prompt_key("sign", {"text": "B"})} <= set(b.entries)
    got = b.select(2, ["sign", "sign"], torch.tensor([0, 1]), torch.zeros(2), k=1, rule="always",
                   metadata=[{"text": "B"}, {"text": "A"}])
    assert [e.meta["text"] for _, e in got] == ["B", "A"]
    tensors, state = b.state_dict()
    again = _buffer(capacity_per_prompt=1)
    again.load_state_dict(tensors, state)
    assert set(again.entries) == set(b.entries) and again.visits == b.visits


def test_importance_weight_on_the_full_density_is_clipped_both_ways():
    kept = torch.tensor([[True, True], [True, True]])
    pi_old = torch.tensor([[0.001, 0.001], [-0.001, -0.001]])   # mean-reduced log-ratios of 1e-3
    beta = torch.zeros(2, 2)
    w, _ = importance_weights(pi_old, beta, kept, correction="sequence", form="geomean", cap=None)
    assert torch.allclose(w[:, 0], torch.exp(torch.tensor([0.001, -0.001])))          # ≈ 1 as sampled
    w, st = importance_weights(pi_old, beta, kept, correction="sequence", form="geomean", cap=None,
                               scale=256, clip=2.0)                                     # × D = 256 dims
    assert torch.allclose(w[:, 0], torch.exp(torch.tensor([0.256, -0.256])))
    w, st = importance_weights(pi_old * 10, beta, kept, correction="sequence", form="geomean", cap=None,
                               scale=256, clip=2.0)
    assert torch.allclose(w[:, 0], torch.tensor([2.0, 0.5])) and st["replay/capped_frac"] == 1.0
    assert st["replay/w_p10"] <= st["replay/w_p50"] <= st["replay/w_p90"]
