"""Helpers of the 2026-model parity tests: run a pipeline's own `__call__` while recording what it hands
its scheduler, and roll the policy out with Euler on its own grid (what FlowMatchEuler does)."""
from __future__ import annotations

import pytest
import torch


def record_call(pipe, call):
    """Run `call()` (a pipeline `__call__`) recording each `scheduler.step(model_output, t, sample)`;
    returns (result, [(model_output, t, sample, sigmas of the scheduler at that step)])."""
    seen = []
    sched = pipe.scheduler
    step = sched.step

    def recording_step(model_output, timestep, sample, *args, **kw):
        seen.append((model_output.detach().clone().float(), torch.as_tensor(timestep).clone(), sample.clone().float(),
                     sched.sigmas.clone().float()))
        return step(model_output, timestep, sample, *args, **kw)

    sched.step = recording_step
    try:
        return call(), seen
    finally:
        sched.step = step


def euler_rollout(policy, prompts, x, steps, guidance):
    """Euler on `policy.sigmas(steps)`: (decoded images, velocities per step, the grid)."""
    sigmas = policy.sigmas(steps)
    cond = policy.encode_prompts(prompts)
    vs = []
    with torch.no_grad():
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            v = policy.velocity(x, s.expand(x.shape[0]), cond, guidance)
            vs.append(v)
            x = x + (s_next - s) * v
        return policy.decode(x), vs, sigmas


def perturb_trainable(policy, seed=1, scale=0.3):
    gen = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=gen) * scale for k, v in policy.trainable_state_dict().items()}
    policy.load_trainable_state_dict(state)


def tiny_run(raw: dict, tmp_path, overrides: list[str]):
    """Train 1 iteration of the YAML config `raw` (a dict, reward swapped for brightness) with
    `overrides`; returns (Trainer, record, LoRA changed?)."""
    import yaml

    from flowpo import config
    from flowpo.training.trainer import Trainer

    raw = dict(raw, reward={"names": ["tiny_pipelines:brightness_reward"], "weights": [1.0]})
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = config.load(str(path), None, overrides)
    tr = Trainer(cfg, tmp_path / "run")
    before = {k: v.clone() for k, v in tr.policy.trainable_state_dict().items()}
    rec = tr.train_iteration(0)
    after = tr.policy.trainable_state_dict()
    return tr, rec, any(not torch.equal(before[k], after[k]) for k in before)


TINY_RUN = [
    "model.lora_rank=4", "model.lora_alpha=8", "model.gradient_checkpointing=false", "model.dtype=fp32",
    "model.device=cpu", "train.iterations=1", "sample.steps=3", "sample.prompts_per_iteration=2",
    "sample.group_size=2", "sample.batch_size=4", "sample.prompts_file=null", "eval.prompts_file=null",
    "eval.prompts=2", "eval.samples_per_prompt=1", "eval.steps=2", "train.minibatches=1", "log.progress=false",
    "log.tensorboard=false",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A test module's runs at one torch thread (imported by the 2026 model tests)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def check_bf16_velocity_and_gradients(policy, prompts, guidance: float) -> None:
    """In bf16 with gradient checkpointing: fp32 velocities and images in [0, 1], finite LoRA
    gradients, fp32 trainable weights."""
    x = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(8))
    v = policy.velocity(x, torch.tensor([0.9, 0.3]), policy.encode_prompts(prompts), guidance)
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
    v.square().mean().backward()
    grads = [p.grad for p in policy.trainable_parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert all(p.dtype == torch.float32 for p in policy.trainable_parameters())
    images = policy.decode(x)
    assert images.dtype == torch.float32 and 0 <= images.min() and images.max() <= 1
