"""Fast tests of the embedded default: prompts, network, policy (CFG, LoRA, full), rewards."""
from __future__ import annotations

import json
import random

import pytest
import torch

from flowpo.embedded import prompts as P
from flowpo.embedded.classifier import blur
from flowpo.embedded.flow_net import LORA_TARGETS, FlowNet
from flowpo.policy.base import Policy
from flowpo.policy.embedded import EmbeddedPolicy
from flowpo.embedded.rewards import EMBEDDED_REWARDS


# ---- prompts ---------------------------------------------------------------------------------------
def test_prompt_digit_round_trip_every_template_and_digit():
    for d in range(10):
        for p in P.train_prompts(d) + P.heldout_prompts(d):
            assert P.prompt_digit(p) == d, p


def test_prompt_digit_errors():
    with pytest.raises(ValueError, match="no digit"):
        P.prompt_digit("a cat")
    with pytest.raises(ValueError, match="several"):
        P.prompt_digit("a 3 and a seven")
    assert P.prompt_digit("Seven!") == 7


def test_tokenize_shapes_unk_and_pad():
    tok = P.tokenize(["a handwritten 7", "a drawing of the number seven", ""], max_len=8)
    assert tok.shape == (3, 8) and tok.dtype == torch.long
    assert tok[0, :3].tolist() == [P.VOCAB["a"], P.VOCAB["handwritten"], P.VOCAB["7"]]
    assert (tok[0, 3:] == P.PAD).all()
    assert tok[1, 1].item() == P.UNK  # "drawing" is not a training word
    assert tok[1, 5].item() == P.VOCAB["seven"]
    assert (tok[2] == P.PAD).all()
    # every template fits in max_len, so the digit token is never cut
    for d in range(10):
        for p in P.train_prompts(d) + P.heldout_prompts(d):
            assert (P.tokenize([p]) > P.PAD).sum() == len(P._words(p))


def test_sample_prompts_deterministic():
    a = P.sample_prompts(torch.Generator().manual_seed(3), 20, "heldout")
    b = P.sample_prompts(torch.Generator().manual_seed(3), 20, "heldout")
    assert a == b and all(p in sum((P.heldout_prompts(d) for d in range(10)), []) for p in a)
    assert P.sample_prompts(random.Random(1), 5) == P.sample_prompts(random.Random(1), 5)


# ---- network ---------------------------------------------------------------------------------------
def test_flownet_shape_and_mode_invariance():
    torch.manual_seed(0)
    net = FlowNet()
    for p in net.out.parameters():  # zero-initialised output: make it non-trivial
        torch.nn.init.normal_(p, std=0.1)
    x, s = torch.randn(4, 1, 16, 16), torch.rand(4)
    tok = P.tokenize(["a handwritten 3", "digit 1", "", "number 9"])
    v_train = net.train()(x, s, tok)
    v_eval = net.eval()(x, s, tok)
    assert v_train.shape == (4, 1, 16, 16)
    assert torch.equal(v_train, v_eval)


# ---- policy ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_policy():
    return EmbeddedPolicy(mode="lora", lora_rank=4, lora_alpha=4.0)


def _inputs(policy, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, 1, 16, 16), generator=g)
    sigma = torch.rand(n, generator=g)
    cond = policy.encode_prompts(P.sample_prompts(g, n))
    return x, sigma, cond


def test_policy_protocol_and_cfg_equals_two_forwards(lora_policy):
    pol = lora_policy
    assert isinstance(pol, Policy) and pol.latent_shape == (1, 16, 16)
    x, s, cond = _inputs(pol)
    g = 4.5
    v = pol.velocity(x, s, cond, g)
    v_c = pol.velocity(x, s, cond, 1.0)
    v_u = pol.velocity(x, s, {"tokens": P.null_tokens(len(x))}, 1.0)
    assert v.dtype == torch.float32 and v.shape == x.shape
    torch.testing.assert_close(v, v_u + g * (v_c - v_u), rtol=1e-5, atol=1e-5)
    assert pol.evals_per_row(1.0) == 1 and pol.evals_per_row(g) == 2


def test_decode_range(lora_policy):
    img = lora_policy.decode(torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0]).view(5, 1, 1, 1).expand(5, 1, 16, 16))
    assert img.shape == (5, 1, 16, 16)
    assert img[:, 0, 0, 0].tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]


def test_lora_trainable_only_lora_and_initial_equals_base():
    pol = EmbeddedPolicy(mode="lora", lora_rank=4, lora_alpha=8.0)
    names = list(pol.trainable_state_dict())
    assert names and all("lora_" in n for n in names)
    assert all(any(f".{t}." in n or n.startswith(f"{t}.") for t in LORA_TARGETS) for n in names)
    assert {id(p) for p in pol.trainable_parameters()} == {id(p) for p in pol.module.parameters() if p.requires_grad}
    x, s, cond = _inputs(pol)
    with torch.no_grad():
        v0 = pol.velocity(x, s, cond, 4.5)
        with pol.disable_adapter():
            v_base = pol.velocity(x, s, cond, 4.5)
        assert torch.equal(v0, v_base)  # B = 0 at start
        for p in pol.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
        v1 = pol.velocity(x, s, cond, 4.5)
        with pol.disable_adapter():
            v_base_after = pol.velocity(x, s, cond, 4.5)
    assert not torch.allclose(v1, v0)
    assert torch.equal(v_base_after, v_base)
    assert all(p.requires_grad for p in pol.trainable_parameters())  # restored after the context


def test_trainable_state_round_trip_and_save(tmp_path):
    pol = EmbeddedPolicy(mode="lora", lora_rank=2, lora_alpha=2.0)
    state = {k: torch.randn_like(v) for k, v in pol.trainable_state_dict().items()}
    pol.load_trainable_state_dict(state)
    for k, v in pol.trainable_state_dict().items():
        assert torch.equal(v, state[k])
    with pytest.raises(KeyError):
        pol.load_trainable_state_dict({"nope": torch.zeros(1)})
    pol.save_pretrained(str(tmp_path / "ad"))
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "ad" / "adapter.safetensors"))
    assert set(saved) == set(state)
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["lora_alpha"] == 2.0 and cfg["target_modules"] == LORA_TARGETS


def test_full_mode_reference_is_frozen_copy():
    pol = EmbeddedPolicy(mode="full")
    assert len(pol.trainable_parameters()) == len(list(pol.module.parameters()))
    x, s, cond = _inputs(pol)
    with torch.no_grad():
        v0 = pol.velocity(x, s, cond, 1.0)
        for p in pol.trainable_parameters():
            p.add_(0.01)
        with pol.disable_adapter():
            assert torch.equal(pol.velocity(x, s, cond, 1.0), v0)
        assert not torch.allclose(pol.velocity(x, s, cond, 1.0), v0)


def test_missing_weights_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        EmbeddedPolicy(weights=str(tmp_path / "none.safetensors"))


# ---- rewards ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def test_digits():
    from flowpo.embedded.pretrain import load_data

    data = load_data(seed=0)
    return data["x_test"][:64], data["y_test"][:64]


def test_rewards_shape_and_finite(test_digits):
    x, y = test_digits
    prompts = [P.train_prompts(int(d))[0] for d in y]
    for name, fn in EMBEDDED_REWARDS.items():
        r = fn(x, prompts)
        assert r.shape == (len(x),) and r.dtype == torch.float32 and torch.isfinite(r).all(), name
    rgb = fn(x[:2].expand(2, 3, 16, 16), prompts[:2])  # colour input is accepted
    assert rgb.shape == (2,)


def test_jpeg_noise_larger_than_blank():
    g = torch.Generator().manual_seed(0)
    noise, blank = torch.rand((2, 1, 16, 16), generator=g), torch.zeros(2, 1, 16, 16)
    kb = EMBEDDED_REWARDS["jpeg_incompressibility"]
    assert (kb(noise, ["1", "2"]) > kb(blank, ["1", "2"])).all()
    assert torch.equal(EMBEDDED_REWARDS["jpeg_compressibility"](noise, ["1", "2"]), -kb(noise, ["1", "2"]))


def test_digit_alignment_real_digits(test_digits):
    x, y = test_digits
    r = EMBEDDED_REWARDS["digit_alignment"](x, [P.heldout_prompts(int(d))[1] for d in y])
    assert r.mean() > 0.9
    wrong = EMBEDDED_REWARDS["digit_alignment"](x, [P.train_prompts((int(d) + 1) % 10)[0] for d in y])
    assert wrong.mean() < 0.1


def test_stroke_quality_prefers_crisp(test_digits):
    x, _ = test_digits
    crisp = ((x - 0.5) * 4 + 0.5).clamp(0, 1)  # sharpened strokes
    sq = EMBEDDED_REWARDS["stroke_quality"]
    assert (sq(crisp, [""] * len(x)) > sq(blur(blur(crisp)), [""] * len(x))).float().mean() > 0.95
    assert sq(torch.zeros(1, 1, 16, 16), [""]).item() < 0.05
