"""The run configuration's schema: one dataclass per part (DESIGN.md), every field with its default
and, in the string literal under it, its help text (what `flowpo config` prints).

Loading, overrides, checking and the help listing are in `flowpo.config`, which re-exports these
classes. Fields whose allowed values come from a part's registry are typed `str` here and checked
against the registry there (`flowpo.config.CHOICES`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

RESOLVED_KEYS = ("sample.sigmas", "train.lr_horizon")
"""Keys a run fills in itself when they are null (and lists under `resolved` in its config.yaml)."""


@dataclass
class ModelConfig:
    kind: str = "embedded"
    """Which policy adapter (flowpo.policy.registry.POLICY_KINDS): the embedded digits model, or a diffusers SD3/SD3.5, FLUX.1, Wan2.1 (wan), Qwen-Image (qwen_image), Z-Image (zimage), FLUX.2 [dev]/[klein] (flux2) or Wan2.2 A14B (wan22) folder, or an editing model (flux_kontext, qwen_image_edit) whose prompt rows name source images."""
    path: Optional[str] = None
    """Local diffusers pipeline folder (sd3, flux) or a flow.safetensors file (embedded; default: shipped)."""
    mode: Literal["lora", "full"] = "lora"
    """Train a LoRA adapter (reference = adapter disabled) or all weights (reference = frozen copy)."""
    lora_rank: int = 8
    """LoRA rank r."""
    lora_alpha: float = 16.0
    """LoRA alpha; the adapter's scale is alpha / r."""
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Network compute dtype; kernels always run in fp32."""
    resolution: Optional[int] = None
    """Image side in pixels; None = the pipeline's own default (embedded: 16)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (real models)."""
    device: str = "auto"
    """'auto' (cuda:LOCAL_RANK when CUDA is available, else cpu), or an explicit torch device."""
    attention: Literal["auto", "math", "flash", "efficient", "cudnn"] = "auto"
    """CUDA attention kernel of torch's scaled_dot_product_attention, for the whole process: 'auto'
    (torch chooses), 'math' (the reference kernel: use it if bf16 gradients turn NaN/inf), or one
    fused kernel alone (torch raises if it cannot take the inputs). No effect on the CPU."""
    max_sequence_length: Optional[int] = None
    """Text tokens for T5 (real models); None = the pipeline's default (SD3 256, FLUX/Qwen-Image/Wan 512)."""
    num_frames: int = 81
    """Frames per video (wan only)."""
    max_area: Optional[int] = None
    """flux_kontext: output pixels h·w at the aspect ratio of `resolution` (the pipeline's max_area); None = 1024²."""
    image_resolution: Optional[int] = None
    """Editing models, the source images' size for the VAE: flux_kontext resizes them to this side in px
    (None = the pipeline's rule: the Kontext training size nearest the source's aspect);
    qwen_image_edit to about this side² px at the source's aspect (None = the pipeline's 1024²)."""
    options: dict[str, Any] = field(default_factory=dict)
    """This model.kind's own keyword arguments, model.options.<key>=value (zimage: cfg_truncation,
    cfg_normalization, negative_prompt; flux2: text_encoder_out_layers; wan22: guidance_2,
    boundary_ratio, train_experts); an unknown key fails naming the allowed ones."""
    cfg_grad: Literal["conditional", "both"] = "conditional"
    """True CFG in the update (guidance ≠ 1): 'conditional' back-propagates through the conditional
    branch only, the unconditional one detached (Flow-GRPO's training), 'both' through both.
    Values are the same; only the gradient differs. FLUX (guidance embedding) has one branch."""
    compile: bool = False
    """Regional torch.compile of the transformer's repeated blocks for rollout and update
    (flowpo.regional): dynamic shapes, nothing recompiles after the first iteration; outputs equal
    eager up to rounding. Off by default: on the CPU it compiles for tens of seconds and gains nothing
    measurable (docs/gpu.md); not yet measured on a GPU."""
    cfg_uncond: Literal["joint", "recompute", "reuse"] = "reuse"
    """How true CFG's two branches run (flowpo.guided): 'joint' one forward of 2N rows (the
    pipelines' batching; the update back-propagates through all of them); 'recompute' two
    forwards of N rows, the unconditional one without a graph; 'reuse' as recompute, but the update
    takes the rollout's unconditional outputs where the weights are still the rollout's (before
    the iteration's first optimizer step): trained weights bit-identical to 'recompute'. One
    latent per row and stochastic step is kept for it. Only with cfg_grad=conditional."""


@dataclass
class SampleConfig:
    steps: int = 10
    """T: sampling steps of the training rollouts (Flow-GRPO: 10)."""
    shift: float = 3.0
    """Time shift s of the embedded model's grid σ̃ = s·σ / (1 + (s−1)·σ) (diffusers policies use
    their scheduler's own shift, dynamic where the scheduler config says so)."""
    sigmas: Optional[list[float]] = None
    """The σ grid of the training rollouts, steps + 1 values from at most 1 down to 0. null: the
    policy's own (the pipeline scheduler's set_timesteps(steps) for diffusers models, the shifted
    grid for the embedded one). A run writes the grid it used into its config.yaml."""
    guidance: float = 1.0
    """Guidance scale during rollouts and the loss (true CFG, or FLUX's guidance embedding). The
    embedded default uses 1.0: at CFG 4.5 its base model already aligns 99.8% of the time, leaving
    nothing to learn (the GPU configs set the papers' 4.5 / 3.5)."""
    kernel: str = "flow_grpo"
    """Step kernel for the stochastic steps (flowpo.sde.KERNELS)."""
    noise_level: float = 0.7
    """Kernel noise: a (Flow-GRPO, CPS), η (DanceGRPO, DDIM)."""
    reduction: Literal["mean", "sum"] = "mean"
    """Reduce the per-step Gaussian log-density over latent dims by mean (papers) or sum (exact)."""
    prompts_per_iteration: int = 8
    """B: distinct prompts per iteration (global, across ranks)."""
    group_size: int = 8
    """G: samples per prompt."""
    shared_noise: bool = False
    """Give every member of a group the same initial noise (DanceGRPO, Stepwise)."""
    prompts_file: Optional[str] = None
    """Training prompts, one per line (default: the embedded model's training templates)."""
    batch_size: int = 32
    """Rows per model call in rollouts; the loss reuses the same chunks so the first ratio is exactly 1."""


@dataclass
class PlanConfig:
    kind: str = "all_but_last"
    """Which steps are SDE and trained each iteration (flowpo.plans.PLANS)."""
    train_fraction: float = 0.99
    """all_but_last: fraction of steps trained (Flow-GRPO's timestep_fraction)."""
    subset_fraction: float = 0.6
    """random_subset: fraction of usable steps trained per sample (DanceGRPO)."""
    window_size: int = 2
    """random_window / sliding_window: window size w (random_window: the maximum)."""
    window_min: int = 2
    """random_window: the minimum window size."""
    window_range: float = 0.5
    """random_window, random_steps: the window (the drawn steps) lies inside the first `window_range`
    fraction of the steps."""
    num_steps: int = 3
    """random_steps: k, the distinct steps drawn (one draw per iteration, shared by every row) that are
    SDE and trained (DGPO: 4 of the first 5; Flow-DPPO: 3 of the first half)."""
    strategy: Literal["frozen", "random", "progressive", "progressive_decay"] = "progressive"
    """sliding_window: how the window moves (MixGRPO)."""
    tau: int = 25
    """sliding_window: iterations between moves (τ)."""
    stride: int = 1
    """sliding_window: steps moved each time (s)."""
    tau_decay: float = 0.9
    """sliding_window progressive_decay: τ_l = max(tau_min, round(τ·tau_decay^l))."""
    tau_min: int = 1
    """sliding_window progressive_decay: smallest τ."""
    truncate: Literal["none", "sigma", "fraction"] = "none"
    """Late-step truncation (OP-GRPO): none, or do not train the steps whose σ_t is below
    truncate_at (sigma), or the last truncate_at fraction of the steps (fraction)."""
    truncate_at: float = 0.5
    """plan.truncate's threshold: a σ in [0, 1] (sigma) or a fraction in [0, 1) (fraction)."""
    strata: int = 6
    """stratified: k training steps per iteration, one from each of k strata of the steps
    first … ⌊train_fraction·T⌋ − 1 (AWM's authors: 6 of a 14-step grid); capped at the number of
    those steps."""
    strata_first: int = 1
    """stratified: the first step a stratum may hold (1: never σ = 1, AWM's GenEval/OCR configs;
    0: their PickScore config)."""


@dataclass
class SolverConfig:
    kind: str = "euler"
    """Deterministic solver for the ODE steps after the last SDE step (dpm2m: MixGRPO-Flash;
    flowpo.solvers.TAILS)."""
    compression: float = 1.0
    """r̃: the post-window segment's step count from the n = T − l − w remaining steps (dpm2m only;
    solver.step_rule)."""
    step_rule: Literal["ceil", "mixgrpo"] = "ceil"
    """dpm2m tail: ⌈n·r̃⌉ post-window steps ('ceil'), or int((n + 1)·r̃) − 1 as MixGRPO's public
    code takes ('mixgrpo'); at least 1 either way (flowpo.solvers.compressed_steps)."""
    warm_start: bool = False
    """dpm2m tail: continue the DPM-Solver++ 2M history of the grid steps before it, so its first
    step is second order (MixGRPO's public code); false restarts it at first order."""
    grid: Literal["euler", "dpm2m"] = "euler"
    """How the rollout's deterministic grid steps (sample.kernel=ode, or a plan's ODE steps) are
    taken: Euler, or DPM-Solver++ 2M with its history along the grid (DiffusionNFT's rollout)."""


@dataclass
class RewardConfig:
    names: list[str] = field(default_factory=lambda: ["digit_alignment"])
    """Registered reward names or `package.module:function` dotted paths."""
    weights: list[float] = field(default_factory=lambda: [1.0])
    """One weight per reward."""
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-reward options, reward.options.<name>.<key>=value: local model paths, device, dtype,
    batch_size, frames (videos: first | mean), scaling, … (README, Rewards; `flowpo.rewards`)."""
    overlap: bool = False
    """Score each finished rollout chunk in a worker thread while the next chunk samples (remote
    or slow scorers; flowpo.rewards.overlap). The scorer is then called once per chunk of
    sample.batch_size rows instead of once per iteration: the same rewards for any scorer that
    scores each image on its own, deterministic whatever the timing."""
    aggregation: Literal["sum_then_normalize", "normalize_then_sum"] = "sum_then_normalize"
    """Multi-reward: Flow-GRPO sums weighted rewards then normalises; MixGRPO normalises each then sums
    (with advantage.kind=stepwise: the gains of the sum, or the sum of each reward's normalised gains)."""


@dataclass
class AdvantageConfig:
    kind: str = "group"
    """Per-sample group z-score (GRPO) or per-step gains on Tweedie rewards (Stepwise-Flow-GRPO;
    flowpo.advantages.ESTIMATORS)."""
    std: Literal["global", "group"] = "global"
    """kind=group: denominator = std of all rewards of the iteration (Flow-GRPO default) or of each
    group. No effect on stepwise gains (see gain_std)."""
    gain_std: Literal["group", "global"] = "group"
    """kind=stepwise: gains minus their group mean, divided by the group's std (the paper) or by the
    std of all gains of the iteration (small advantages for groups whose rewards saturate)."""
    eps: float = 1e-4
    """Added to the std."""
    clip: float = 5.0
    """Advantages are clipped to ±clip."""
    substeps: int = 5
    """stepwise: T' Euler ODE sub-steps from x_t to σ = 0 for the intermediate estimate (1 = Tweedie)."""
    normalize: Literal["joint", "per_step"] = "joint"
    """stepwise: normalise all gains of a group jointly, or each step separately."""
    estimate_batch_size: int = 256
    """stepwise: rows per model call of the intermediate (Tweedie) estimates; lower it on a GPU at
    SD3/FLUX sizes."""


@dataclass
class ReplayConfig:
    k: int = 0
    """OP-GRPO replay: replayed trajectories per group (the group becomes G − k fresh + k replayed);
    0 turns replay off."""
    capacity_per_prompt: int = 2
    """Best trajectories kept per prompt."""
    max_age: int = 8
    """Entries older than this (in age_unit) expire."""
    decay: float = 0.0
    """Ranking score = reward − decay·age (0: rank by reward only)."""
    age_unit: Literal["iterations", "visits"] = "iterations"
    """What an entry's age counts: iterations since it was stored, or visits of its prompt (times
    the prompt was drawn since), so a prompt that is rarely drawn keeps its entry."""
    store: Literal["best", "above_mean"] = "best"
    """Which fresh trajectories the buffer may keep: any (ranked by reward; 'best'), or only those
    whose reward beats their group's mean ('above_mean': the high-quality ones, so a replayed entry
    carried a positive advantage when it was stored)."""
    fill: Literal["fixed", "on_hit"] = "fixed"
    """Fresh samples per group: G − k always ('fixed'), or G − k only when the group's prompt has a
    buffer entry and G otherwise ('on_hit': OP-GRPO's groups)."""
    rule: Literal["always", "beats_best", "no_spread", "beats_best_or_no_spread"] = "beats_best_or_no_spread"
    """When a replayed trajectory enters a group (adaptive rule) or 'always'."""
    is_correction: Literal["none", "sequence", "per_step"] = "sequence"
    """Importance correction for replayed samples: one sequence weight, per-step weights, or none."""
    is_form: Literal["product", "geomean"] = "geomean"
    """Sequence weight: Π_t π_old/β, or its geometric mean over the kept steps."""
    is_cap: Optional[float] = 2.0
    """Truncate the importance weight at this value (None: no cap)."""
    is_density: Literal["reduced", "sum"] = "reduced"
    """The density the weight is a ratio of: the log-probs as the loss reduces them
    (sample.reduction; with mean, w stays within 1e-4 of 1), or the full Gaussian density over
    all latent dimensions (log-ratio × D), clipped to [1/is_sum_clip, is_sum_clip]."""
    is_sum_clip: float = 2.0
    """is_density=sum: the weight's two-sided clip."""
    hold_graphs: bool = False
    """Sequence weights (is_correction=sequence) without a π_old pass of their own: the replayed
    chunks of the update's first minibatch take π_old from their own forward at every step, keep
    each step's graph until the chunk's last step has run, then backward once with the weight
    known. Saves one no-grad forward per replayed (row, kept step); costs the activations of all
    the chunk's kept steps at once (R rows × K steps instead of one step). Off: π_old is computed
    up front (bit-identical to earlier versions). The per-step forms never need a pass of their own.
    Ignored under sharded full fine-tuning (FSDP2), whose ranks must make the same backward calls,
    and with loss.forward_rows=trained (the forward's rows differ from the pass's)."""
    tail: Literal["drop", "regenerate"] = "drop"
    """After truncation: drop the replayed tail, or regenerate it with the current policy (ODE) and
    use the regenerated image's reward for this iteration's advantage."""
    truncate: Literal["none", "sigma", "fraction"] = "sigma"
    """Late-step truncation of replayed trajectories (their off-policy ratios are ill-conditioned
    there): none, drop the steps whose σ_t is below truncate_at (sigma), or the last truncate_at
    fraction of the steps (fraction)."""
    truncate_at: float = 0.5
    """replay.truncate's threshold: a σ in [0, 1] (sigma) or a fraction in [0, 1) (fraction)."""


@dataclass
class LossConfig:
    clip_range: float = 1e-4
    """PPO clip ε on the per-step ratio (mean-reduced log-probs: 1e-4; CPS: 1e-5)."""
    kl_beta: float = 0.0
    """β of the KL to the reference policy on the step means (Flow-GRPO)."""
    forward_rows: Literal["chunk", "trained"] = "chunk"
    """clipped_surrogate: the update's forward at step t runs on the whole rollout chunk ('chunk': the
    first ratio is exactly 1) or only on the chunk's rows that train t ('trained': plans with per-row
    steps, DanceGRPO's, stop paying for untrained rows; ratio 1 up to float rounding)."""
    kl_form: Literal["flow_grpo", "exact"] = "flow_grpo"
    """KL on step means: divided by 2·s_t² as Flow-GRPO's code (β values carry over), or by 2·s² (exact)."""


@dataclass
class ObjectiveConfig:
    kind: str = "clipped_surrogate"
    """What the update minimises (flowpo.objectives.OBJECTIVES): on stored transitions the clipped
    surrogate, GRPO-Guard or Flow-DPPO (options under loss.* and below); on final samples
    DiffusionNFT, AWM or DGPO (options below)."""
    nft_beta: float = 1.0
    """diffusion_nft: β of the implicit policies v± (the paper: 1, 0.1 for OCR and multi-reward)."""
    adv_max: float = 5.0
    """diffusion_nft, awm: A_max; NFT's optimality r = ½ + ½·clip(A/A_max, −1, 1), AWM's A' = clip(A)/A_max."""
    ref_beta: float = 1e-4
    """diffusion_nft, awm, dgpo: weight of mean (v_θ − v_ref)² to the reference (adapter disabled); 0: off."""
    old_ramp: float = 0.0
    """diffusion_nft, awm, dgpo: θ_old ← η·θ_old + (1−η)·θ after iteration i with η = min(old_ramp·i, old_max);
    0 keeps θ_old = θ at each iteration start (no copy kept)."""
    old_max: float = 0.5
    """diffusion_nft, awm, dgpo: the largest η of old_ramp."""
    anchor_beta: float = 0.0
    """awm: weight of mean (v_θ − v_old)² to the soft copy θ_old (the paper's EMA term: 1)."""
    awm_weighting: Literal["uniform", "t", "ghuber"] = "ghuber"
    """awm: the log-likelihood surrogate ℓ = −φ(matching error, σ) (the paper's default: ghuber)."""
    awm_p: float = 0.25
    """awm: the ghuber exponent p."""
    awm_clip: float = 1.0
    """awm: clip range ε of the ratio exp(ℓ_θ − ℓ_old) (the paper's configs: 1)."""
    allow_cfg: bool = False
    """diffusion_nft, awm: allow sample.guidance ≠ 1 (CFG on). Both are CFG-free methods; a config
    that turns CFG on for them is refused unless this is true."""
    dgpo_beta: float = 100.0
    """dgpo: β of the group preference σ(β/G·Σ_g A·(m_θ − m_ref)) (the authors' GenEval/OCR configs: 100;
    PickScore 10)."""
    dgpo_clip: float = 0.01
    """dgpo: PPO-style clip ε of the matching-loss ratio exp(m_old − m_θ) (GenEval/OCR configs: 1e-2)."""
    dgpo_reference: Literal["reference", "old"] = "reference"
    """dgpo: the model the group preference is measured against: the frozen reference (adapter
    disabled; the authors' default) or the soft copy θ_old (their use_ema_ref, TDM-R1's dynamic reference)."""
    dgpo_group_noise: bool = True
    """dgpo: the members of a group share the forward-process noise ε at each trained step (the
    authors' use_shared_noise); false draws it per row."""
    old_sampling_from: Optional[int] = None
    """dgpo: from this iteration on the rollout samples with the soft copy θ_old (the authors'
    switch_ema_ref); null: never."""
    dppo_threshold: float = 1e-5
    """flow_dppo: δ, the divergence above which an update moving away from π_old is masked (the
    Gaussian KL per latent dimension; UniRL's kl_mask_threshold 1e-5)."""
    guard_reweight: bool = True
    """grpo_guard: divide each step's loss by |dt| (GRPO-Guard's gradient reweighting); false keeps
    only RatioNorm."""


@dataclass
class TrainConfig:
    iterations: int = 100
    """Number of iterations (rollout → rewards → advantages → updates)."""
    seed: int = 0
    """Seed for every random stream (prompts, noise, plans, dropout-free model init of LoRA)."""
    lr: float = 3e-4
    """AdamW learning rate (the peak, with a schedule)."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Learning rate over the run: constant, or decayed from `lr` at iteration 0 to
    `lr_final`·`lr` at `iterations` (linear or cosine)."""
    lr_final: float = 0.0
    """Final learning rate as a fraction of `lr` (lr_schedule linear/cosine)."""
    lr_horizon: Optional[int] = None
    """Iterations over which lr_schedule decays; null: train.iterations when the run starts (the
    run's config.yaml then records it, so `--resume train.iterations=…` does not rewind the rate)."""
    adam_eps: float = 1e-8
    """AdamW ε. Steps are lr·m/(√v + ε): with ε well above the gradients' scale they shrink with the
    gradients (SGD-like) instead of keeping size lr whatever the signal."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    max_grad_norm: float = 1.0
    """Gradient-norm clip."""
    minibatches: int = 2
    """Optimizer steps per iteration (the samples are split into this many minibatches)."""
    inner_epochs: int = 1
    """Passes over the iteration's samples."""
    cache_reference: bool = True
    """inner_epochs > 1: keep the frozen reference's no-grad outputs of the first pass (the KL's step
    means with loss.kl_beta > 0, v_ref with objective.ref_beta > 0) and reuse them in the later
    passes, which would recompute the same numbers (same weights, states and noise). Costs one
    latent-sized fp32 tensor per trained (row, step) until the iteration ends (at most the size of
    the stored states); false recomputes them every pass. No effect at inner_epochs = 1."""
    ema: float = 0.0
    """EMA decay of the trainable weights used for evaluation (0: off)."""
    checkpoint_every: int = 10
    """Iterations between checkpoints (0: only at the end)."""
    keep_checkpoints: int = 2
    """How many checkpoints to keep."""
    threads: int = 0
    """torch threads; 0: every usable core but one, at least 1 (a run beside another busy process
    then slows in proportion instead of crawling: flowpo.parts.resolve_threads)."""


@dataclass
class EvalConfig:
    every: int = 10
    """Iterations between evaluations; evaluation also runs before the first and after the last."""
    steps: int = 40
    """ODE steps of evaluation sampling (Flow-GRPO: 40)."""
    guidance: Optional[float] = None
    """Guidance for evaluation (None: sample.guidance)."""
    prompts: int = 40
    """Held-out prompts evaluated (embedded: balanced over the 10 digits)."""
    prompts_file: Optional[str] = None
    """Evaluation prompts, one per line (default: the embedded model's held-out templates)."""
    samples_per_prompt: int = 2
    """Samples per held-out prompt."""
    seed: int = 1234
    """Fixed seed of the evaluation noise (the same images are compared across iterations)."""


@dataclass
class LogConfig:
    tensorboard: bool = True
    """Write TensorBoard event files under DIR/tb."""
    wandb: bool = False
    """Also log to Weights & Biases (needs `pip install wandb`)."""
    progress: bool = True
    """Show a progress bar."""
    grids: bool = True
    """Write evaluation sample grids to DIR/samples."""


@dataclass
class Config:
    preset: Optional[str] = None
    """The preset this config started from (informational)."""
    resolved: list[str] = field(default_factory=list)
    """Keys the run filled in itself (sample.sigmas, train.lr_horizon); reset when this file seeds a new run."""
    model: ModelConfig = field(default_factory=ModelConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
