"""The cost of one training iteration at the transformer widths users train (issue 20, item 3).

What it measures. One iteration of each preset (flow_grpo, dance_grpo, mix_grpo_flash, op_grpo
by default) run through flowpo's own `Trainer.train_iteration`, on diffusers pipelines whose
TRANSFORMER is built from the published config at its real width but with fewer blocks, and
with RANDOM weights (no checkpoint is read or downloaded):

    SD3.5-Medium  SD3Transformer2DModel: width 1536 (24 heads × 64), patch 2, 16 latent channels,
                  joint_attention_dim 4096, caption_projection_dim 1536, pooled 2048,
                  pos_embed_max_size 384, qk_norm rms_norm, dual attention in blocks 0–12;
                  `--depth` blocks of 24 (default 2).
    FLUX.1-dev    FluxTransformer2DModel: width 3072 (24 heads × 128), 64 packed channels,
                  joint_attention_dim 4096, pooled 768, guidance embedding, RoPE axes (16, 56, 56);
                  `--flux-depth D,S` double/single blocks of 19/38 (default 1,2).

The text encoders (1-layer CLIPs giving hidden states 768 and 1280 and pooled 768 + 1280 = 2048
for SD3, 768 for FLUX; a 1-layer T5 of d_model 4096) and the VAE (16 latent channels, 8×
downsampling, each model's scaling/shift factors, a few channels per level) are tiny, so their
cost is NOT representative; what is representative is the transformer's cost and everything
flowpo does around it (kernels, plans, log-probs, advantages, replay, optimizer step). The
schedulers are the models' own (SD3: shift 3; FLUX: dynamic shift, base 0.5, max 1.15).

How. Each configuration runs in a fresh subprocess (so that its peak memory is its own): the
pipeline folder (built once per model and depth by another subprocess, `save_tiny` from
tests/tiny_pipelines.py) is loaded by the Trainer with overrides `model.kind`, `model.path`,
`model.resolution`, `sample.steps=T`, `sample.group_size=G`, ...; iteration 0 is a warm-up,
iteration 1 is timed. The prompt pool is `--prompts` fixed prompts, so OP-GRPO's replay hits in
the timed iteration as in its steady state (its replayed tail is regenerated). Per iteration:

- wall time of `train_iteration`;
- forward: time inside the transformer's `forward` (the transformer CLASS's forward is wrapped,
  so the LoRA-injected module, the full-mode reference copy and any wrapper's inner call are all
  counted), its number of calls and the rows they carried (2 per sample under SD3's true CFG);
- backward: time inside `torch.Tensor.backward` (the objectives call `loss.backward()`; the
  graph is the transformer's, plus the kernel's few element-wise ops);
- share = (forward + backward) / iteration (goal of the issue: ≥ 90%); the rest (text encoders,
  VAE decode, reward, kernels, advantages, optimizer, Python) is listed too;
- peak RSS: `ru_maxrss`, a process high-water mark. It is read twice: after building the
  Trainer (loading included: "setup"), then reset after the warm-up (Linux
  `/proc/self/clear_refs` = 5) and read after the timed iteration(s): the iterations' own peak
  ("iter"; nan where the reset is not allowed). On a GPU, also the peak allocated memory of the
  timed iterations, and every timer synchronises the device.

Where the calls go (issue 20, item 4): every transformer forward (and every backward) is also
charged to its purpose, the innermost of: rollout (flowpo.rollout.Rollout.sample),
update (Trainer._update: chunk_loss re-scoring pi_theta), reference (inside policy.disable_adapter:
LoRA adapters off, or the full-mode reference copy), old_prepare (objective.begin: DiffusionNFT's
v_old, AWM's ll_old and EMA anchor), replay_pi_old (OP-GRPO's pi_old of the replayed rows: the
clipped surrogate's begin),
replay_tail (its regenerated tails), stepwise (Tweedie estimates), evaluation (Trainer.evaluate,
timed once after the iterations with `--evaluate`). `--passes-out` writes one row per configuration
and purpose (appending, so several invocations make one table; `--label` tags a variant), e.g.:

    .venv/bin/python benchmarks/real_shapes.py --models sd3 --depth 1 --res 128 --groups 2 --steps 4 \
        --timed 2 --presets flow_grpo --evaluate --set eval.prompts=4 --set eval.samples_per_prompt=2 \
        --set eval.steps=40 --out /tmp/a.csv --passes-out benchmarks/real_shapes_passes.csv

`--timed N` times N iterations after the warm-up and reports the one of median wall time (and
the fastest as s_per_iteration_min): on a loaded machine a single iteration is noisy.

Sweeps: resolution, group size G and steps T, one varied at a time around a base point (the
middle value of each list unless `--base RES,G,T`); the exponent b of time ≈ a·x^b is fitted by
least squares on log–log over each sweep, for the wall time and for forward+backward. Writes a
CSV (`--out`) and prints markdown tables.

Full measurement recommended on a 2-core CPU (estimated 14–16 minutes on an idle machine,
longer under load: the FLUX points are about two thirds of it; sweeps on flow_grpo only, the
other three presets at the base point):

    .venv/bin/python benchmarks/real_shapes.py --models sd3,flux --depth 1 --flux-depth 1,1 \\
        --res 128,192,256 --groups 2,4,8 --steps 4,8,12 --base 128,2,4 --sweep-presets flow_grpo \\
        --threads 2 --out benchmarks/real_shapes.csv

The defaults (SD3 2 blocks, FLUX 1 + 2, 128/256/384 px, G 2/4/8, T 4/8/16, all four presets
swept) are several times that. Below ~128 px one call is bound by reading the weights, not by
the tokens, so resolution exponents fitted there come out low. T = 2 is refused by flowpo's
config check (plan.window_size 2 must be ≤ T − 1, for every plan); use T ≥ 3.

Memory notes: diffusers loads safetensors memory-mapped, so weight pages count in RSS only when
first touched (the setup peak can be below the model's size; SD3's 384²×1536 positional table
is computed at construction, in float64, which is most of SD3's setup peak; a forward touches
only its centre crop).

Smoke test (about a minute): `.venv/bin/python benchmarks/real_shapes.py --quick --models sd3
--out /tmp/real_shapes.csv`. On a GPU, e.g. `--depth 24 --flux-depth 19,38 --res 512 --set
model.device=cuda --set model.dtype=bf16 --set model.gradient_checkpointing=true`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent / "tests"
PRESETS = "flow_grpo,dance_grpo,mix_grpo_flash,op_grpo"
PROMPTS = ["a photo of a cat", "a red dog on the grass", "a blue car in the city", "two birds on a tree",
           "a bowl of fruit", "a house by the lake", "a cat and a dog", "a green apple on a table"]
# Per model: the guidance of the papers' setups (SD3: true CFG, two rows per sample; FLUX.1-dev:
# the guidance embedding) and the LoRA of each policy's default (Flow-GRPO SD3: r 32, α 64).
MODEL_DEFAULTS = {"sd3": {"guidance": 4.5, "lora_rank": 32, "lora_alpha": 64},
                  "flux": {"guidance": 3.5, "lora_rank": 64, "lora_alpha": 128}}


# ---------------------------------------------------------------------------------------------
# The pipelines: real-width transformers, tiny text encoders and VAE (random weights)

def sd35_medium_transformer(depth: int):
    """SD3.5-Medium's transformer config (stabilityai/stable-diffusion-3.5-medium) with `depth`
    of its 24 blocks; dual attention in the blocks among 0–12 that remain."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=depth,
        attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
        caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
        dual_attention_layers=tuple(range(min(depth, 13))), qk_norm="rms_norm",
    )


def flux1_dev_transformer(double: int, single: int):
    """FLUX.1-dev's transformer config with `double` of 19 double-stream and `single` of 38
    single-stream blocks."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=double, num_single_layers=single,
        attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
        pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
    )


def _clip(tokenizer, hidden: int, projection: int, with_projection: bool):
    """A 1-layer CLIP text model with the real output widths (tiny_pipelines' config, resized)."""
    from tiny_pipelines import _clip_text_config
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cfg = _clip_text_config(tokenizer, hidden=hidden, projection=projection)
    cfg.num_hidden_layers, cfg.intermediate_size, cfg.num_attention_heads = 1, 64, 2
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)


def _t5(tokenizer, d_model: int = 4096):
    """A 1-layer T5 encoder whose output width is the transformers' joint_attention_dim."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_ff=64, d_kv=8, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, dropout_rate=0.1, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0))


def _vae(scaling_factor: float, shift_factor: float):
    """AutoencoderKL with 16 latent channels and 8× downsampling (4 levels), few channels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4, sample_size=64,
        scaling_factor=scaling_factor, shift_factor=shift_factor,
        use_quant_conv=False, use_post_quant_conv=False,  # as the SD3 and FLUX VAEs
    )


def build_pipeline(model: str, depth: int, flux_depth: tuple[int, int], seed: int = 0):
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline
    from tiny_pipelines import clip_tokenizer, t5_tokenizer

    torch.manual_seed(seed)
    if model == "sd3":
        tok, tok2, tok3 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
        # encode_prompt: CLIP-L ‖ CLIP-G hidden states (768 + 1280) padded to T5's 4096 and
        # concatenated with the T5 tokens; pooled = CLIP-L ‖ CLIP-G projections (768 + 1280 = 2048).
        return StableDiffusion3Pipeline(
            transformer=sd35_medium_transformer(depth),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=_vae(1.5305, 0.0609),
            text_encoder=_clip(tok, 768, 768, True), tokenizer=tok,
            text_encoder_2=_clip(tok2, 1280, 1280, True), tokenizer_2=tok2,
            text_encoder_3=_t5(tok3), tokenizer_3=tok3,
        )
    if model == "flux":
        tok, tok2 = clip_tokenizer(), t5_tokenizer()
        return FluxPipeline(
            transformer=flux1_dev_transformer(*flux_depth),
            scheduler=FlowMatchEulerDiscreteScheduler(
                shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                base_image_seq_len=256, max_image_seq_len=4096),
            vae=_vae(0.3611, 0.1159),
            text_encoder=_clip(tok, 768, 768, False), tokenizer=tok,  # pooled 768
            text_encoder_2=_t5(tok2), tokenizer_2=tok2,
        )
    raise ValueError(f"unknown model {model!r}; use sd3 or flux")


def child_build(spec: dict) -> dict:
    import torch
    from tiny_pipelines import save_tiny

    torch.set_num_threads(spec["threads"])
    t = time.perf_counter()
    # --build-device cuda: the random init runs on the GPU (FLUX.1-dev's 12 B parameters take minutes
    # on CPU cores); --build-dtype bf16 halves the folder (24 GB instead of 48 GB for FLUX.1-dev)
    with torch.device(spec.get("build_device", "cpu")):
        pipe = build_pipeline(spec["model"], spec["depth"], tuple(spec["flux_depth"]))
    if spec.get("build_dtype", "fp32") == "bf16":
        pipe.to(torch.bfloat16)
    n = sum(p.numel() for p in pipe.transformer.parameters())
    save_tiny(pipe, spec["folder"])
    return {"transformer_params": n, "build_s": time.perf_counter() - t}


# ---------------------------------------------------------------------------------------------
# One configuration, in its own process

def _sync(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


def _outermost_timer(owner, fn, record):
    """fn timed (device-synchronised) when not nested in another call `owner` times; then
    record(seconds, args, kwargs). `owner._depth` counts the nesting."""
    def timed(*a, **k):
        if owner._depth:
            return fn(*a, **k)
        owner._depth += 1
        _sync(owner.cuda)
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            _sync(owner.cuda)
            record(time.perf_counter() - t, a, k)
            owner._depth -= 1
    return timed


class Meter:
    """Accumulated seconds and calls of the functions it wraps (nested calls counted once)."""

    def __init__(self, cuda: bool):
        self.cuda, self.s, self.calls, self.rows, self._depth = cuda, 0.0, 0, 0, 0

    def reset(self) -> None:
        self.s, self.calls, self.rows = 0.0, 0, 0

    def wrap(self, fn, rows_of=None):
        def record(seconds, a, k):
            self.s += seconds
            self.calls += 1
            if rows_of is not None:
                self.rows += rows_of(a, k)
        return _outermost_timer(self, fn, record)


# What each transformer call is for (issue 20, item 4): the innermost purpose wins.
PURPOSES = ("rollout", "update", "reference", "old_prepare", "replay_pi_old", "replay_tail", "stepwise",
            "evaluation", "other")
PURPOSE_DOC = {
    "rollout": "flowpo.rollout.sample (SDE/ODE grid steps and the solver tail), under objective.sampling()",
    "update": "Trainer._update: the objective's chunk_loss re-scoring pi_theta (with grad), minus what is below",
    "reference": "inside policy.disable_adapter() (LoRA: adapters off; full: the frozen reference copy)",
    "old_prepare": "objective.begin: DiffusionNFT v_old under theta_old, AWM ll_old (+ EMA anchor)",
    "replay_pi_old": "ClippedSurrogate.begin: pi_old of the replayed rows under the current weights",
    "replay_tail": "OPReplay.select: regenerate_tails (ODE from the truncation point, current policy)",
    "stepwise": "advantage.intermediate: Stepwise Tweedie estimates (T' ODE sub-steps per needed state)",
    "evaluation": "Trainer.evaluate -> evaluate_policy (ODE sampling of eval.prompts x samples x eval.steps)",
    "other": "any other call",
}


class Purposes:
    """A stack of purposes; wrapped functions push theirs; the forward/backward wrappers charge the
    current (innermost) purpose: seconds, calls and rows."""

    def __init__(self, cuda: bool):
        self.cuda, self.stack, self._depth = cuda, ["other"], 0
        self.reset()

    def reset(self) -> None:
        self.fwd = {p: [0.0, 0, 0] for p in PURPOSES}   # seconds, calls, rows
        self.bwd = {p: [0.0, 0] for p in PURPOSES}      # seconds, calls

    def during(self, fn, name: str):
        def run(*a, **k):
            self.stack.append(name)
            try:
                return fn(*a, **k)
            finally:
                self.stack.pop()
        return run

    def during_cm(self, cm_fn, name: str):
        import contextlib

        @contextlib.contextmanager
        def run(*a, **k):
            with cm_fn(*a, **k):
                self.stack.append(name)
                try:
                    yield
                finally:
                    self.stack.pop()
        return run

    def wrap(self, fn, table: str, rows_of=None):
        def record(seconds, a, k):  # charged to the purpose current at the end (= at the start: a stack)
            rec = getattr(self, table)[self.stack[-1]]
            rec[0] += seconds
            rec[1] += 1
            if rows_of is not None:
                rec[2] += rows_of(a, k)
        return _outermost_timer(self, fn, record)

    def snapshot(self) -> dict:
        out = {}
        for p in PURPOSES:
            out[f"{p}_fwd_s"], out[f"{p}_calls"], out[f"{p}_rows"] = self.fwd[p]
            out[f"{p}_bwd_s"] = self.bwd[p][0]
        return out


def _register_cpu_attention_flops() -> None:
    """torch's FlopCounterMode knows the CUDA attention kernels, not the CPU one that SDPA picks on
    a CPU: count it the same way (Q·Kᵀ and P·V, 2 FLOPs per multiply-add)."""
    import torch
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or op in flop_registry:
        return

    @register_flop_formula(op)
    def _cpu_attention(q, k, v, *args, out_shape=None, **kwargs):
        b, h, s, d = q
        return 2 * b * h * s * k[-2] * d + 2 * b * h * s * k[-2] * v[-1]


class FlopProbe:
    """Counts the FLOPs of ONE transformer forward (torch.utils.flop_counter) the first time an armed
    purpose calls it, as FLOPs per row; the call is then untimed (it runs in the warm-up)."""

    def __init__(self, why: "Purposes"):
        self.why, self.armed, self.per_row = why, False, float("nan")

    def wrap(self, fn, rows_of):
        def probe(*a, **k):
            if not (self.armed and self.why.stack[-1] in ("update", "rollout")):
                return fn(*a, **k)
            from torch.utils.flop_counter import FlopCounterMode

            self.armed = False
            with FlopCounterMode(display=False) as fc:
                out = fn(*a, **k)
            self.per_row = fc.get_total_flops() / max(1, rows_of(a, k))
            return out
        return probe


# bf16 dense tensor-core peak, TFLOP/s (vendor datasheets; no sparsity)
PEAK_TFLOPS = {"H200": 989.4, "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 PCIe": 756.0, "A100": 312.0}


def _peak_tflops(cuda: bool, given: float) -> float:
    if given > 0:
        return given
    if cuda:
        import torch

        name = torch.cuda.get_device_name()
        for key, v in PEAK_TFLOPS.items():
            if key in name:
                return v
    return float("nan")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child_run(spec: dict) -> dict:
    import torch

    from flowpo import config
    from flowpo.training.trainer import Trainer

    torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    cfg = config.load(None, spec["preset"], spec["overrides"])
    tr = Trainer(cfg, spec["run_dir"])
    setup_s = time.perf_counter() - t0
    setup_rss = _peak_rss_mib()
    cuda = tr.device.type == "cuda"
    policy, pipe = tr.policy, tr.policy.pipe
    fwd, bwd, text, vae = Meter(cuda), Meter(cuda), Meter(cuda), Meter(cuda)

    def rows_of(a, k):
        x = k.get("hidden_states", a[1] if len(a) > 1 else None)
        return int(x.shape[0]) if x is not None else 0

    cls = type(pipe.transformer)  # peft injects LoRA layers inside it; the class forward is the call
    orig_forward, orig_backward = cls.forward, torch.Tensor.backward
    why = Purposes(cuda)
    _register_cpu_attention_flops()
    flops = FlopProbe(why)
    cls.forward = fwd.wrap(why.wrap(flops.wrap(orig_forward, rows_of), "fwd", rows_of), rows_of)
    torch.Tensor.backward = bwd.wrap(why.wrap(orig_backward, "bwd"))
    # purposes: instance attributes shadow the methods the Trainer calls; the trainer module's
    # the rollout part's sampling; the clipped surrogate's begin makes only the replayed rows' π_old passes
    P = tr.parts
    P.rollout.sample = why.during(P.rollout.sample, "rollout")
    tr._update = why.during(tr._update, "update")
    tr.evaluate = why.during(tr.evaluate, "evaluation")
    clipped = type(P.objective).__name__ == "ClippedSurrogate"
    P.objective.begin = why.during(P.objective.begin, "replay_pi_old" if clipped else "old_prepare")
    P.advantage.intermediate = why.during(P.advantage.intermediate, "stepwise")
    P.replay.extend = why.during(P.replay.extend, "replay_tail")
    policy.disable_adapter = why.during_cm(policy.disable_adapter, "reference")
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        enc = getattr(pipe, name, None)
        if enc is not None:
            enc.forward = text.wrap(enc.forward)
    policy.decode = vae.wrap(policy.decode)
    timed = []
    try:
        t = time.perf_counter()
        flops.armed = bool(spec.get("flops", True))  # one forward of the warm-up is counted (untimed)
        tr.train_iteration(0)  # warm-up
        warmup_s = time.perf_counter() - t
        rss_reset = _reset_peak_rss()  # from here on ru_maxrss is the timed iterations' own peak
        if cuda:
            torch.cuda.reset_peak_memory_stats(tr.device)
        for it in range(1, 1 + spec["timed"]):
            for m in (fwd, bwd, text, vae, why):
                m.reset()
            _sync(cuda)
            t = time.perf_counter()
            rec = tr.train_iteration(it)
            _sync(cuda)
            dt = time.perf_counter() - t
            timed.append({
                "s_per_iteration": dt, "forward_s": fwd.s, "backward_s": bwd.s,
                "transformer_share": (fwd.s + bwd.s) / dt,
                "forward_calls": fwd.calls, "forward_rows": fwd.rows, "backward_calls": bwd.calls,
                "text_encoder_s": text.s, "vae_decode_s": vae.s,
                "other_s": dt - fwd.s - bwd.s - text.s - vae.s,
                "rollout_s": rec["time/rollout_s"], "reward_s": rec["time/reward_s"],
                "advantage_s": rec["time/advantage_s"], "update_s": rec["time/update_s"],
                "nfe_per_image": rec["nfe_per_image"], "trained_steps": rec["plan/trained_steps"],
                "optimizer_steps": rec.get("train/optimizer_steps", float("nan")),
                "replayed_rows": rec.get("replay/admitted", 0),
                "regenerate_nfe": rec.get("replay/regenerate_nfe", 0.0),
                "stepwise_nfe": rec.get("stepwise/nfe", 0.0),
                **why.snapshot(),
            })
            timed[-1].update(_mfu(timed[-1], flops.per_row, tr.cfg.model.mode, _peak_tflops(cuda, spec.get("peak_tflops", 0.0))))
        evaluation = {}
        if spec.get("evaluate"):  # one evaluation after the timed iterations (not part of them)
            for m in (fwd, bwd, text, vae, why):
                m.reset()
            _sync(cuda)
            t = time.perf_counter()
            tr.evaluate()
            _sync(cuda)
            evaluation = {"eval_s": time.perf_counter() - t, "eval_fwd_s": why.fwd["evaluation"][0],
                          "eval_calls": why.fwd["evaluation"][1], "eval_rows": why.fwd["evaluation"][2],
                          "eval_vae_s": vae.s, "eval_text_s": text.s,
                          "eval_prompts": tr.cfg.eval.prompts, "eval_samples_per_prompt": tr.cfg.eval.samples_per_prompt,
                          "eval_steps": tr.cfg.eval.steps, "eval_batch_size": tr.cfg.sample.batch_size}
    finally:
        cls.forward, torch.Tensor.backward = orig_forward, orig_backward
    walls = sorted(r["s_per_iteration"] for r in timed)
    median = min(timed, key=lambda r: abs(r["s_per_iteration"] - walls[(len(walls) - 1) // 2]))
    params = list(pipe.transformer.parameters())
    return {
        **median, **evaluation, "timed_iterations": len(timed), "s_per_iteration_min": walls[0],
        "kl_beta": tr.cfg.loss.kl_beta, "objective": tr.cfg.objective.kind, "ref_beta": tr.cfg.objective.ref_beta,
        "old_ramp": tr.cfg.objective.old_ramp, "eval_every": spec.get("eval_every", tr.cfg.eval.every),
        "transformer_params_m": sum(p.numel() for p in params) / 1e6,
        "trainable_params_m": sum(p.numel() for p in policy.trainable_parameters()) / 1e6,
        "peak_rss_mib_iteration": _peak_rss_mib() if rss_reset else float("nan"),
        "peak_rss_mib_setup": setup_rss,
        "peak_gpu_mib": torch.cuda.max_memory_allocated(tr.device) / 2**20 if cuda else float("nan"),
        "setup_s": setup_s, "warmup_s": warmup_s, "threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------------------------------------
# The sweep (parent process)

def _mfu(r: dict, per_row: float, mode: str, peak_tflops: float) -> dict:
    """Model FLOPs utilisation (PaLM's definition: the model's FLOPs, not the hardware's, so a
    gradient-checkpointing recompute is not counted). A forward row costs `per_row` (counted); the
    update's backward costs 2× its forward in full mode (gradients of the activations and of the
    weights) and 1× with LoRA (activations only: the frozen weights get no gradient, the adapters'
    share is negligible). Two denominators: the update phase's wall time (Trainer's time/update_s,
    optimizer and all) and its transformer time (forward + backward charged to the update). Rows
    are counted as the transformer sees them: SD3's true CFG batches the unconditional row with the
    conditional one, and the backward runs over the whole batch whatever model.cfg_grad says."""
    fwd = per_row * r["update_rows"]
    model_flops = fwd * (3.0 if mode == "full" else 2.0)
    transformer_s = r["update_fwd_s"] + r["update_bwd_s"]
    peak = peak_tflops * 1e12
    return {"flops_per_row_g": per_row / 1e9, "update_model_tflop": model_flops / 1e12, "peak_tflops": peak_tflops,
            "update_mfu": model_flops / (r["update_s"] * peak) if r["update_s"] > 0 else float("nan"),
            "update_transformer_mfu": model_flops / (transformer_s * peak) if transformer_s > 0 else float("nan"),
            "rollout_mfu": per_row * r["rollout_rows"] / (r["rollout_fwd_s"] * peak) if r["rollout_fwd_s"] > 0 else float("nan")}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def fit_exponent(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y on log x (nan with fewer than two distinct x)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len({p[0] for p in pts}) < 2:
        return float("nan")
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sum((p[0] - mx) ** 2 for p in pts)


def _spawn(kind: str, spec: dict, timeout: float) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS)] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), f"--_{kind}", json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=timeout)
    result = next((line[7:] for line in proc.stdout.splitlines()[::-1] if line.startswith("RESULT ")), None)
    if proc.returncode != 0 or result is None:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"{kind} {spec.get('model')} {spec.get('preset', '')} failed (rc {proc.returncode}):\n{tail}")
    return json.loads(result)


def _points(res: list[int], groups: list[int], steps: list[int], base: tuple[int, int, int], sweep: bool):
    """(resolution, G, T) → the sweeps it belongs to; only the base point when not `sweep`."""
    pts: dict[tuple[int, int, int], list[str]] = {base: ["base"]}
    if sweep:
        for name, values, pos in (("res", res, 0), ("G", groups, 1), ("T", steps, 2)):
            for v in values:
                p = list(base)
                p[pos] = v
                pts.setdefault(tuple(p), []).append(name)
    return pts


def _fmt(x, nd=2):
    if isinstance(x, float):
        return "–" if math.isnan(x) else f"{x:.{nd}f}"
    return str(x)


def _pct(x: float) -> str:
    return "–" if math.isnan(x) else f"{x:.1%}"


def write_passes(path: Path, rows: list[dict]) -> list[str]:
    """One row per (configuration, purpose) with forward calls, rows, seconds and the share of the
    iteration; the evaluation (when timed) as its own row: one evaluation's cost relative to one
    iteration, and per iteration at the default eval.every cadence. Appends to `path` if it exists
    (same columns) so that several invocations (modes, --set variants) make one table."""
    import csv

    out = []
    for r in rows:
        base = {k: r[k] for k in ("model", "preset", "mode", "label", "depth", "resolution", "group_size", "steps",
                                  "prompts", "kl_beta", "objective", "ref_beta", "old_ramp", "s_per_iteration",
                                  "forward_calls", "forward_rows", "forward_s", "backward_s")}
        for pname in PURPOSES:
            calls, fs, bs = r[f"{pname}_calls"], r[f"{pname}_fwd_s"], r[f"{pname}_bwd_s"]
            if pname == "evaluation" or (calls == 0 and bs == 0):
                continue
            out.append({**base, "purpose": pname, "calls": calls, "rows": r[f"{pname}_rows"],
                        "forward_s_purpose": fs, "backward_s_purpose": bs,
                        "share_of_iteration": (fs + bs) / r["s_per_iteration"],
                        "eval_every": "", "per_iteration_at_cadence": ""})
        if "eval_s" in r:
            out.append({**base, "purpose": "evaluation", "calls": r["eval_calls"], "rows": r["eval_rows"],
                        "forward_s_purpose": r["eval_fwd_s"], "backward_s_purpose": 0.0,
                        "share_of_iteration": r["eval_s"] / r["s_per_iteration"],  # one evaluation / one iteration
                        "eval_every": r["eval_every"],
                        "per_iteration_at_cadence": r["eval_s"] / r["eval_every"] / r["s_per_iteration"],
                        "eval_s": r["eval_s"], "eval_setting": f"{r['eval_prompts']}x{r['eval_samples_per_prompt']}"
                                                               f"x{r['eval_steps']} bs{r['eval_batch_size']}"})
    fields = list(dict.fromkeys(k for o in out for k in o)) + ["eval_s", "eval_setting"]
    fields = list(dict.fromkeys(fields))
    old_rows = []
    if path.exists():
        with path.open() as f:
            old_rows = list(csv.DictReader(f))
        fields = list(dict.fromkeys(list(old_rows[0].keys() if old_rows else []) + fields))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        w.writeheader()
        for o in old_rows + out:
            w.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in o.items()})
    lines = ["| model | preset | mode | label | purpose | calls (rows) | fwd s | bwd s | share of iteration |",
             "|---|---|---|---|---|---|---|---|---|"]
    for o in out:
        share = (f"{o['share_of_iteration']:.1%}" if o["purpose"] != "evaluation" else
                 f"one eval = {o['share_of_iteration']:.2f}x an iteration; {o['per_iteration_at_cadence']:.1%} "
                 f"per iteration at eval.every={o['eval_every']}")
        lines.append(f"| {o['model']} | {o['preset']} | {o['mode']} | {o['label']} | {o['purpose']} | "
                     f"{o['calls']} ({o['rows']}) | {o['forward_s_purpose']:.2f} | {o['backward_s_purpose']:.2f} | {share} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="sd3,flux")
    ap.add_argument("--presets", default=None, help=f"default {PRESETS}")
    ap.add_argument("--sweep-presets", default=None,
                    help="presets that get the res/G/T sweeps (default: all of --presets; the others run at "
                         "the base point only)")
    ap.add_argument("--depth", type=int, default=None, help="SD3.5-M blocks of 24 (default 2)")
    ap.add_argument("--flux-depth", default=None, help="FLUX.1-dev double,single blocks of 19,38 (default 1,2)")
    ap.add_argument("--res", default=None, help="resolutions in px (default 128,256,384)")
    ap.add_argument("--groups", default=None, help="group sizes G (default 2,4,8)")
    ap.add_argument("--steps", default=None, help="sampling steps T (default 4,8,16)")
    ap.add_argument("--base", default=None, help="RES,G,T of the base point (default: each list's middle value)")
    ap.add_argument("--prompts", type=int, default=1, help="B: prompts per iteration (also the prompt pool)")
    ap.add_argument("--batch-size", type=int, default=0, help="sample.batch_size (0: all B·G rows in one chunk)")
    ap.add_argument("--text-len", type=int, default=None, help="model.max_sequence_length: T5 tokens (default 16)")
    ap.add_argument("--lora-rank", type=int, default=None, help="default: sd3 32, flux 64 (α = 2r)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timed", type=int, default=1, help="timed iterations after the warm-up (median reported)")
    ap.add_argument("--mode", default="lora", choices=("lora", "full"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    ap.add_argument("--quick", action="store_true",
                    help="smallest sweep for a smoke test: depth 1 (flux 1,1), 64,128 px, G 2, T 3, flow_grpo, "
                         "8 text tokens (explicit options still win)")
    ap.add_argument("--out", default="benchmarks/real_shapes.csv")
    ap.add_argument("--md", default=None, help="also write the markdown tables here")
    ap.add_argument("--work", default=None, help="folder for the pipelines and runs (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep --work afterwards")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per configuration")
    ap.add_argument("--evaluate", action="store_true",
                    help="after the timed iterations, time one Trainer.evaluate (eval.* settings: --set "
                         "eval.prompts=..., eval.samples_per_prompt=..., eval.steps=...)")
    ap.add_argument("--label", default="", help="a tag written in every row (e.g. kl0.04)")
    ap.add_argument("--passes-out", default=None,
                    help="also write one row per (configuration, purpose of the transformer calls) here")
    ap.add_argument("--build-device", default="cpu", help="where the random weights are initialised (cuda: "
                                                           "seconds for FLUX.1-dev's 12 B, not minutes)")
    ap.add_argument("--build-dtype", default="fp32", choices=("fp32", "bf16"), help="dtype of the saved folder")
    ap.add_argument("--peak-tflops", type=float, default=0.0,
                    help="the device's peak TFLOP/s for the MFU columns (default: bf16 dense of a known GPU, "
                         "else MFU is nan)")
    ap.add_argument("--_build", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_run", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._build or args._run:  # a child
        sys.path.insert(0, str(TESTS))
        out = child_build(json.loads(args._build)) if args._build else child_run(json.loads(args._run))
        print("RESULT " + json.dumps(out), flush=True)
        return 0

    q = args.quick
    depth = args.depth if args.depth is not None else (1 if q else 2)
    flux_depth = tuple(_ints(args.flux_depth or ("1,1" if q else "1,2")))
    res = _ints(args.res or ("64,128" if q else "128,256,384"))
    groups = _ints(args.groups or ("2" if q else "2,4,8"))
    steps = _ints(args.steps or ("3" if q else "4,8,16"))
    presets = [p for p in (args.presets or ("flow_grpo" if q else PRESETS)).split(",") if p]
    sweep_presets = set(presets if args.sweep_presets is None else args.sweep_presets.split(","))
    text_len = args.text_len or (8 if q else 16)
    base = tuple(_ints(args.base)) if args.base else (res[len(res) // 2], groups[len(groups) // 2],
                                                        steps[len(steps) // 2])
    if len(base) != 3 or len(flux_depth) != 2:
        ap.error("--base takes RES,G,T and --flux-depth takes DOUBLE,SINGLE")
    models = [m for m in args.models.split(",") if m]
    work = Path(args.work or tempfile.mkdtemp(prefix="flowpo-real-shapes-"))
    work.mkdir(parents=True, exist_ok=True)
    prompts_file = work / "prompts.txt"
    prompts_file.write_text("\n".join((PROMPTS * (args.prompts // len(PROMPTS) + 1))[: args.prompts]) + "\n")
    eval_file = work / "eval_prompts.txt"
    eval_file.write_text("\n".join(PROMPTS) + "\n")
    from flowpo.config_schema import EvalConfig

    eval_every = EvalConfig().every  # the default cadence (the runs themselves set eval.every=0)

    rows = []
    t_all = time.perf_counter()
    try:
        for model in models:
            folder = work / f"{model}_d{depth if model == 'sd3' else '%d+%d' % flux_depth}"
            if not (folder / "model_index.json").exists():
                b = _spawn("build", {"model": model, "depth": depth, "flux_depth": flux_depth,
                                     "folder": str(folder), "threads": args.threads, "build_device": args.build_device,
                                     "build_dtype": args.build_dtype}, args.timeout)
                print(f"built {model}: transformer {b['transformer_params'] / 1e6:.0f} M parameters "
                      f"({b['build_s']:.0f} s) -> {folder}", file=sys.stderr, flush=True)
            md = MODEL_DEFAULTS[model]
            rank = args.lora_rank or md["lora_rank"]
            for preset in presets:
                for (r, g, t), tags in _points(res, groups, steps, base, preset in sweep_presets).items():
                    name = f"{model}_{preset}_r{r}_g{g}_t{t}"
                    run_dir = work / "runs" / name
                    shutil.rmtree(run_dir, ignore_errors=True)
                    overrides = [
                        f"model.kind={model}", f"model.path={folder}", f"model.mode={args.mode}",
                        f"model.lora_rank={rank}", f"model.lora_alpha={2 * rank}", f"model.resolution={r}",
                        f"model.max_sequence_length={text_len}", f"sample.steps={t}", f"sample.group_size={g}",
                        f"sample.prompts_per_iteration={args.prompts}", f"sample.batch_size={args.batch_size or args.prompts * g}",
                        f"sample.guidance={md['guidance']}", f"sample.prompts_file={prompts_file}",
                        "reward.names=[tiny_pipelines:brightness_reward]", "train.minibatches=1",
                        "eval.every=0", f"eval.prompts_file={eval_file}", "train.checkpoint_every=0", f"train.threads={args.threads}",
                        "log.progress=false", "log.tensorboard=false", "log.grids=false", *args.set]
                    spec = {"preset": preset, "model": model, "overrides": overrides, "run_dir": str(run_dir),
                            "threads": args.threads, "timed": max(1, args.timed), "evaluate": args.evaluate,
                            "peak_tflops": args.peak_tflops,
                            "eval_every": eval_every}
                    m = _spawn("run", spec, args.timeout)
                    row = {"model": model, "preset": preset, "mode": args.mode, "label": args.label,
                           "depth": depth if model == "sd3" else "%d+%d" % flux_depth,
                           "resolution": r, "group_size": g, "steps": t, "prompts": args.prompts,
                           "guidance": md["guidance"], "text_len": text_len, "sweeps": ";".join(tags), **m}
                    rows.append(row)
                    print(f"{name:<36} {m['s_per_iteration']:7.2f} s/it  transformer {m['transformer_share']:6.1%}  "
                          f"peak RSS {m['peak_rss_mib_iteration']:6.0f} MiB", file=sys.stderr, flush=True)
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    if not rows:
        return 1

    from flowpo.bench.report import write_csv

    write_csv(Path(args.out), rows)
    passes_lines = []
    if args.passes_out:
        passes_lines = write_passes(Path(args.passes_out), rows)

    lines = [f"command: {' '.join([Path(sys.argv[0]).name] + sys.argv[1:])}",
             f"total {time.perf_counter() - t_all:.0f} s; {rows[0]['threads']} threads; transformers at real width, "
             "reduced depth, random weights", "",
             "| model | preset | px | G | T | s / it | fwd s | bwd s | transformer share | calls (rows) | "
             "text enc s | VAE s | other s | peak RSS MiB (iter / setup) | trainable M / total M |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["model"], r["preset"], r["resolution"], r["group_size"], r["steps"])):
        lines.append(
            f"| {r['model']} d{r['depth']} | {r['preset']} | {r['resolution']} | {r['group_size']} | {r['steps']} | "
            f"{r['s_per_iteration']:.2f} | {r['forward_s']:.2f} | {r['backward_s']:.2f} | {r['transformer_share']:.1%} | "
            f"{r['forward_calls']} ({r['forward_rows']}) | {r['text_encoder_s']:.2f} | {r['vae_decode_s']:.2f} | "
            f"{r['other_s']:.2f} | {_fmt(r['peak_rss_mib_iteration'], 0)} / {r['peak_rss_mib_setup']:.0f} | "
            f"{r['trainable_params_m']:.1f} / {r['transformer_params_m']:.0f} |")
    lines += ["", "Model FLOPs (one forward row counted with torch.utils.flop_counter; the update's backward as 2× "
              "its forward in full mode, 1× with LoRA) and utilisation of the peak "
              f"({_fmt(rows[0]['peak_tflops'], 1)} TFLOP/s; nan: unknown device, pass --peak-tflops)", "",
              "| model | preset | px | G | T | GFLOP / forward row | update TFLOP | update MFU (phase) | "
              "update MFU (transformer time) | rollout MFU | peak GPU MiB |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["model"], r["preset"], r["resolution"], r["group_size"], r["steps"])):
        lines.append(
            f"| {r['model']} d{r['depth']} | {r['preset']} | {r['resolution']} | {r['group_size']} | {r['steps']} | "
            f"{r['flops_per_row_g']:.1f} | {r['update_model_tflop']:.2f} | {_pct(r['update_mfu'])} | "
            f"{_pct(r['update_transformer_mfu'])} | {_pct(r['rollout_mfu'])} | {_fmt(r['peak_gpu_mib'], 0)} |")
    fits = []
    for model in models:
        for preset in presets:
            for var, key in (("res", "resolution"), ("G", "group_size"), ("T", "steps")):
                pts = [r for r in rows if r["model"] == model and r["preset"] == preset
                       and (var in r["sweeps"].split(";") or "base" in r["sweeps"].split(";"))]
                pts = sorted({r[key]: r for r in pts}.values(), key=lambda r: r[key])
                if len(pts) < 2:
                    continue
                xs = [float(r[key]) for r in pts]
                fits.append(f"| {model} | {preset} | {var} | {', '.join(str(int(x)) for x in xs)} | "
                            f"{_fmt(fit_exponent(xs, [r['s_per_iteration'] for r in pts]))} | "
                            f"{_fmt(fit_exponent(xs, [r['forward_s'] + r['backward_s'] for r in pts]))} | "
                            f"{_fmt(fit_exponent(xs, [r['peak_rss_mib_iteration'] for r in pts]))} |")
    if fits:
        lines += ["", "Exponent b of cost ≈ a·x^b (least squares on log–log; other variables at the base point "
                  f"px {base[0]}, G {base[1]}, T {base[2]})", "",
                  "| model | preset | x | values | b: s / iteration | b: forward+backward | b: peak RSS |",
                  "|---|---|---|---|---|---|---|", *fits]
    if passes_lines:
        lines += ["", *passes_lines]
    text = "\n".join(lines)
    print(text)
    if args.md:
        Path(args.md).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
