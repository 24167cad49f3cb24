"""The schedule part: diffusers policies sample on their pipeline scheduler's grid (dynamic shift
included) and an ODE rollout equals the pipeline's own __call__; the embedded model keeps its grid
and a run writes the grid it used into config.yaml; the CFG-gradient option."""
from __future__ import annotations

import pytest
import torch
import yaml

from flowpo import config
from flowpo.schedule import sigmas as make_sigmas

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from tiny_pipelines import T5_LENGTH, save_tiny, tiny_flux_pipeline, tiny_sd3_pipeline  # noqa: E402

RES = 16


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from diffusers import FlowMatchEulerDiscreteScheduler

    root = tmp_path_factory.mktemp("sched")
    dyn = tiny_sd3_pipeline(seed=0)
    dyn.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=4,
                                                    max_image_seq_len=64, base_shift=0.5, max_shift=1.16)
    return {"sd3": save_tiny(tiny_sd3_pipeline(seed=0), root / "sd3"), "sd3_dynamic": save_tiny(dyn, root / "dyn"),
            "flux": save_tiny(tiny_flux_pipeline(seed=0), root / "flux")}


def _policy(name, folders, resolution=RES, **kw):
    from flowpo.policy.registry import build_policy

    return build_policy(name.split("_")[0], folders[name], resolution=resolution, max_sequence_length=T5_LENGTH, **kw)


def _pipeline_run(policy, kind, prompts, noise, T, guidance):
    """The pipeline's own __call__ on `noise` (fp32): (its σ grid, its final latents unpacked)."""
    from diffusers import FluxPipeline

    pipe = policy.pipe
    seen = {}

    def grab(p, i, t, kw):
        seen.setdefault("sigmas", p.scheduler.sigmas.clone())
        return kw

    n, c, h, w = noise.shape
    latents = FluxPipeline._pack_latents(noise, n, c, h, w) if kind == "flux" else noise
    kwargs = {"max_sequence_length": T5_LENGTH}
    if kind == "sd3":
        kwargs["negative_prompt"] = [""] * n
    with torch.no_grad():
        out = pipe(prompt=prompts, num_inference_steps=T, height=RES, width=RES, guidance_scale=guidance,
                   latents=latents, output_type="latent", callback_on_step_end=grab, **kwargs).images
    if kind == "flux":
        out = FluxPipeline._unpack_latents(out, RES, RES, pipe.vae_scale_factor)
    return seen["sigmas"].float(), out.float()


@pytest.mark.parametrize("name,guidance", [("sd3", 4.5), ("sd3_dynamic", 1.0), ("flux", 3.5)])
def test_grid_and_ode_rollout_equal_the_pipeline_call(name, guidance, folders):
    from flowpo.rollout import ode_sample

    torch.manual_seed(0)
    policy = _policy(name, folders)
    T = 6
    prompts = ["a red cat", "a blue dog"]
    noise = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(3))
    pipe_sigmas, pipe_out = _pipeline_run(policy, name.split("_")[0], prompts, noise, T, guidance)
    grid = policy.sigmas(T, 3.0)
    torch.testing.assert_close(grid, pipe_sigmas, rtol=0, atol=1e-7)
    assert not torch.allclose(grid, make_sigmas(T, 3.0))          # not flowpo's own grid
    ours, _ = ode_sample(policy, policy.encode_prompts(prompts), grid, noise, guidance, batch_size=2)
    torch.testing.assert_close(ours, pipe_out, rtol=0, atol=1e-5)


def test_dynamic_shift_follows_the_token_count(folders):
    small, large = _policy("flux", folders, resolution=16), _policy("flux", folders, resolution=32)
    assert small._image_seq_len() * 4 == large._image_seq_len()
    a, b = small.sigmas(10, 3.0), large.sigmas(10, 3.0)
    assert (b[1:-1] > a[1:-1]).all()                                # more tokens: a larger shift
    static = _policy("sd3", folders)
    assert static._timestep_kwargs(10) == {}                        # the tiny SD3 scheduler: fixed shift 3


def test_embedded_run_writes_its_grid_into_config_yaml(tmp_path, tiny):
    from flowpo.training.trainer import Trainer

    cfg = config.load(None, None, tiny + ["sample.shift=2.0"])
    Trainer(cfg, tmp_path / "r")
    written = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["sample"]["sigmas"]
    assert written == make_sigmas(4, 2.0).tolist()
    # the written grid is what a resumed run reads back (keep_resolved, as --resume); seeding a new run
    # from that file drops the run-resolved keys, so other steps or shifts get their own grid
    yml = str(tmp_path / "r" / "config.yaml")
    assert config.load(yml, keep_resolved=True).sample.sigmas == written
    assert config.load(yml).resolved == [] and config.load(yml, None, ["sample.steps=6"]).sample.sigmas is None
    assert config.load(yml).train.lr_horizon is None
    with pytest.raises(config.ConfigError, match="sample.sigmas has 5 values but sample.steps=6 needs 7"):
        config.load(yml, None, ["sample.steps=6"], keep_resolved=True)


def test_diffusers_run_samples_on_the_pipeline_grid(tmp_path, tiny, folders):
    from flowpo.training.trainer import Trainer

    cfg = config.load(None, None, tiny + ["model.kind=sd3", f"model.path={folders['sd3']}", f"model.resolution={RES}",
                                          f"model.max_sequence_length={T5_LENGTH}", "train.iterations=1"])
    tr = Trainer(cfg, tmp_path / "r")
    assert torch.equal(tr.sigmas, tr.policy.sigmas(4, 3.0))
    assert yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["sample"]["sigmas"] == tr.sigmas.tolist()


@pytest.mark.parametrize("kind", ["sd3", "embedded"])
def test_cfg_gradient_conditional_branch_only_or_both(kind, folders):
    from flowpo.policy.embedded import EmbeddedPolicy

    def make(cfg_grad):
        torch.manual_seed(0)
        if kind == "embedded":
            return EmbeddedPolicy(cfg_grad=cfg_grad)
        return _policy("sd3", folders, cfg_grad=cfg_grad)

    grads, values = {}, {}
    for mode in ("conditional", "both"):
        pol = make(mode)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():  # a non-zero adapter so the gradient is informative
            for p in pol.trainable_parameters():
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
        x = torch.randn(2, *pol.latent_shape, generator=gen)
        cond = pol.encode_prompts(["a red cat", "a blue dog"] if kind == "sd3" else ["a handwritten 3"] * 2)
        v = pol.velocity(x, torch.tensor([0.7, 0.4]), cond, 4.5)
        for p in pol.trainable_parameters():
            p.grad = None
        v.sum().backward()
        grads[mode] = torch.cat([p.grad.flatten() for p in pol.trainable_parameters()])
        values[mode] = v.detach()
        if mode == "conditional":  # the gradient of g·v_c alone (one conditional forward)
            for p in pol.trainable_parameters():
                p.grad = None
            (4.5 * pol.velocity(x, torch.tensor([0.7, 0.4]), cond, 1.0)).sum().backward()
            want = torch.cat([p.grad.flatten() for p in pol.trainable_parameters()])
            # equal up to the batch-size-dependent float summation of the 2N-row vs N-row forward
            assert float((grads[mode] - want).norm() / want.norm()) < 1e-4
    assert torch.equal(values["conditional"], values["both"])
    assert not torch.allclose(grads["conditional"], grads["both"])
