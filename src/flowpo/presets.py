"""Named presets: each method is a set of part settings (DESIGN.md). `flowpo presets` lists them.

The embedded default runs T = 10 training steps (Flow-GRPO's value). Where a paper used another
T or iteration budget, the window parameters are scaled; see docs/presets.md for the rule.
"""
from __future__ import annotations

from dataclasses import dataclass



@dataclass(frozen=True)
class Preset:
    description: str
    paper: str
    overrides: dict
    ablation_of: str | None = None  # set for ablation variants (listed apart, not benchmarked by default)


PRESETS: dict[str, Preset] = {
    "flow_grpo": Preset(
        "Flow-GRPO: Flow-GRPO SDE (a=0.7) on every step, all but the last trained",
        "Liu et al. 2025, arXiv 2505.05470",
        {"sample.kernel": "flow_grpo", "sample.noise_level": 0.7, "plan.kind": "all_but_last",
         "plan.train_fraction": 0.99}),
    "dance_grpo": Preset(
        "DanceGRPO: constant-noise SDE (η=0.3) everywhere, a random 60% of steps trained per sample, "
        "shared initial noise per group",
        "Xue et al. 2025, arXiv 2505.07818",
        {"sample.kernel": "dance_grpo", "sample.noise_level": 0.3, "plan.kind": "random_subset",
         "plan.subset_fraction": 0.6, "sample.shared_noise": True}),
    "mix_grpo": Preset(
        "MixGRPO: SDE + training only inside a progressive sliding window (w=2, τ scaled), ODE outside",
        "Li et al. 2025, arXiv 2507.21802",
        {"sample.kernel": "flow_grpo", "sample.noise_level": 0.7, "plan.kind": "sliding_window",
         "plan.strategy": "progressive", "plan.window_size": 2, "plan.tau": 15, "plan.stride": 1,
         "reward.aggregation": "normalize_then_sum"}),
    "mix_grpo_flash": Preset(
        "MixGRPO-Flash: MixGRPO + DPM-Solver++ 2M after the window with r̃=0.4, as MixGRPO's public code: "
        "int((n+1)·r̃) − 1 steps for n remaining, the solver's history kept from the window",
        "Li et al. 2025, arXiv 2507.21802",
        {"sample.kernel": "flow_grpo", "sample.noise_level": 0.7, "plan.kind": "sliding_window",
         "plan.strategy": "progressive", "plan.window_size": 2, "plan.tau": 12, "plan.stride": 1,
         "solver.kind": "dpm2m", "solver.compression": 0.4, "solver.step_rule": "mixgrpo", "solver.warm_start": True,
         "reward.aggregation": "normalize_then_sum"}),
    "mix_grpo_flash_star": Preset(
        "MixGRPO-Flash*: window frozen at the noisiest steps, DPM-Solver++ 2M after it with r̃=0.2",
        "Li et al. 2025, arXiv 2507.21802",
        {"sample.kernel": "flow_grpo", "sample.noise_level": 0.7, "plan.kind": "sliding_window",
         "plan.strategy": "frozen", "plan.window_size": 2, "solver.kind": "dpm2m", "solver.compression": 0.2,
         "reward.aggregation": "normalize_then_sum"}),
    "op_grpo": Preset(
        "OP-GRPO: Flow-GRPO + replay of each prompt's best past trajectory (one per prompt, decayed by "
        "age in the prompt's visits): a group whose prompt has one is G−1 fresh + 1 replayed; "
        "sequence-level importance weight beside the per-step clip; the replayed late steps are "
        "regenerated with the current policy",
        "Zhang et al. 2026, arXiv 2604.04142",
        {"sample.kernel": "flow_grpo", "sample.noise_level": 0.7, "plan.kind": "all_but_last",
         "replay.k": 1, "replay.capacity_per_prompt": 1, "replay.store": "above_mean", "replay.fill": "on_hit",
         "replay.rule": "always",
         "replay.age_unit": "visits", "replay.max_age": 8, "replay.decay": 0.05,
         "replay.is_correction": "sequence", "replay.is_form": "geomean", "replay.is_cap": 2.0,
         "replay.truncate": "sigma", "replay.truncate_at": 0.5, "replay.tail": "regenerate"}),
    "stepwise_grpo": Preset(
        "Stepwise-Flow-GRPO: DDIM-inspired SDE, per-step gain advantages from Tweedie rewards (T'=5)",
        "arXiv 2603.28718",
        {"sample.kernel": "ddim", "sample.noise_level": 1.0, "plan.kind": "all_but_last",
         "advantage.kind": "stepwise", "advantage.substeps": 5, "advantage.normalize": "joint",
         "sample.shared_noise": True}),
}


# Successors on final samples (docs/methods.md: defaults from the authors' SD3.5-M configs; the
# old-policy ramp, 0.001 per optimizer step over ~1k steps there, is scaled to the embedded budget
# of ~60 iterations: 0.001·1000/60 ≈ 0.017 per iteration). Both are CFG-free (guidance 1, set here
# so a YAML's guidance cannot turn CFG on unnoticed) and take one optimizer step per rollout.
PRESETS["diffusion_nft"] = Preset(
    "DiffusionNFT: deterministic DPM-Solver++ 2M rollouts, flow matching on the final samples with implicit "
    "positive/negative policies (β=1), optimality r from the global-std advantage, θ_old a soft copy (η ramped "
    "to 0.5), one optimizer step per rollout, CFG-free",
    "Zheng et al. 2025, arXiv 2509.16117",
    {"objective.kind": "diffusion_nft", "sample.kernel": "ode", "solver.grid": "dpm2m", "sample.guidance": 1.0,
     "plan.kind": "all_but_last", "plan.train_fraction": 0.99, "objective.nft_beta": 1.0, "objective.adv_max": 5.0,
     "objective.ref_beta": 1e-4, "objective.old_ramp": 0.017, "objective.old_max": 0.5, "advantage.std": "global",
     "train.minibatches": 1})
# AWM as first shipped (a random half of the usable steps, KL 0.003, two optimizer steps per
# rollout): flowpo_awm_flash was chosen and benchmarked with it, and the ablation keeps its plan
_AWM_V1 = {"objective.kind": "awm", "sample.kernel": "ode", "plan.kind": "random_subset", "plan.subset_fraction": 0.5,
           "objective.adv_max": 5.0, "objective.ref_beta": 0.003, "objective.anchor_beta": 1.0,
           "objective.old_ramp": 0.017, "objective.old_max": 0.3, "objective.awm_weighting": "ghuber",
           "objective.awm_p": 0.25, "objective.awm_clip": 1.0, "advantage.std": "global"}
PRESETS["awm"] = Preset(
    "Advantage Weighted Matching: ODE rollouts, advantage-weighted flow-matching loss (ghuber, p=0.25) at 4 "
    "stratified steps of 1-8 (never σ=1; the authors' 6 of 1-11 on 14 steps, scaled to 10) shared by the batch, "
    "KL 0.001 to the reference, an EMA anchor (decay ramped to 0.3), one optimizer step per rollout, CFG-free",
    "Xue et al. 2025, arXiv 2509.25050",
    {**_AWM_V1, "plan.kind": "stratified", "plan.strata": 4, "plan.strata_first": 1, "plan.train_fraction": 0.9,
     "objective.ref_beta": 0.001, "sample.guidance": 1.0, "train.minibatches": 1})
PRESETS["flowpo_awm_flash"] = Preset(
    "flowpo's combination on AWM: AWM's objective trained only in a frozen window over the 5 noisiest steps, "
    "DPM-Solver++ 2M after it (r̃=0.4, as MixGRPO-Flash), learning rate 1e-3 decayed along a cosine to 1e-4",
    "this project (docs/methods.md)",
    {**_AWM_V1, "sample.guidance": 1.0, "plan.kind": "sliding_window", "plan.strategy": "frozen",
     "plan.window_size": 5, "solver.kind": "dpm2m", "solver.compression": 0.4, "train.lr": 1e-3,
     "train.lr_schedule": "cosine", "train.lr_final": 0.1})
# The methods practitioners compare with in 2026 (issue 30; docs/methods.md). Their SD3.5-M configs
# sample T = 10 steps like the embedded default, so step settings carry over unchanged; DGPO's
# iteration-based settings are scaled by the rule above (1000 of their steps ≈ 60 iterations here).
PRESETS["flow_grpo_fast"] = Preset(
    "Flow-GRPO-Fast: Flow-GRPO SDE (a=0.8) and training only in a random 2-step window of the first half, ODE "
    "elsewhere; a group shares its initial noise, so its members branch at the window; clip 1e-5",
    "Liu et al. 2025, arXiv 2505.05470 (flow_grpo README and pickscore_sd3_fast config)",
    {"sample.kernel": "flow_grpo", "sample.noise_level": 0.8, "plan.kind": "random_window", "plan.window_size": 2,
     "plan.window_min": 2, "plan.window_range": 0.5, "sample.shared_noise": True, "loss.clip_range": 1e-5})
PRESETS["dgpo"] = Preset(
    "DGPO: ODE rollouts; a group-level DPO preference (β=100) on the matching losses of the final samples at 4 "
    "random steps of the first 5, PPO-style clip 1e-2 against an EMA copy, KL 0.02, one optimizer step per iteration",
    "Luo et al. 2025, arXiv 2510.08425",
    {"objective.kind": "dgpo", "sample.kernel": "ode", "plan.kind": "random_steps", "plan.num_steps": 4,
     "plan.window_range": 0.5, "objective.dgpo_beta": 100.0, "objective.dgpo_clip": 0.01, "objective.ref_beta": 0.02,
     "objective.old_ramp": 0.017, "objective.old_max": 0.3, "objective.old_sampling_from": 30,
     "advantage.std": "group", "train.minibatches": 1})
PRESETS["grpo_guard"] = Preset(
    "GRPO-Guard: Flow-GRPO with RatioNorm (the ratio's mean bias added back and its per-step scale taken out) "
    "and per-step gradient reweighting (1/|dt|), clip 2e-6, per-group std, learning rate 1e-4",
    "Wang et al. 2025, arXiv 2510.22319",
    {**PRESETS["flow_grpo"].overrides, "objective.kind": "grpo_guard", "loss.clip_range": 2e-6,
     "advantage.std": "group", "train.lr": 1e-4})
PRESETS["flow_dppo"] = Preset(
    "Flow-DPPO: Flow-GRPO SDE on 3 random steps of the first half (ODE elsewhere); the unclipped ratio masked where "
    "the exact Gaussian KL to π_old exceeds 1e-5 per dimension and the update moves away",
    "arXiv 2606.11025 (UniRL / verl-omni)",
    {"sample.kernel": "flow_grpo", "sample.noise_level": 0.7, "plan.kind": "random_steps", "plan.num_steps": 3,
     "plan.window_range": 0.5, "objective.kind": "flow_dppo", "objective.dppo_threshold": 1e-5})
_OP = PRESETS["op_grpo"].overrides
# the replay settings flowpo's combinations were tuned and benchmarked with (the op_grpo preset
# before it followed the paper's description: docs/methods.md), kept so their results stand
_OP_REPLAY_V1 = {"replay.k": 1, "replay.is_correction": "sequence", "replay.is_form": "geomean", "replay.is_cap": 2.0,
                 "replay.truncate": "sigma", "replay.truncate_at": 0.5, "replay.rule": "beats_best_or_no_spread"}
_SW = PRESETS["stepwise_grpo"].overrides
PRESETS["flowpo_best"] = Preset(
    "flowpo's combination: Stepwise credit (DDIM SDE, T'=3 Tweedie rewards) + OP-GRPO replay (k=1, "
    "sequence-level IS, truncation) + 2 clipped passes over each iteration's samples in up to 4 minibatches "
    "(whole rollout chunks: 2-3 at the embedded default's batch size 32)",
    "this project (docs/methods.md)",
    {**_SW, **_OP_REPLAY_V1, "advantage.substeps": 3,
     "train.inner_epochs": 2, "train.minibatches": 4})
PRESETS["flowpo_fast"] = Preset(
    "flowpo's cheaper combination: flowpo_best's credit and sample reuse, trained only inside a MixGRPO "
    "progressive window (w=3, τ=15), ODE outside",
    "this project (docs/methods.md)",
    {**PRESETS["flowpo_best"].overrides, "plan.kind": "sliding_window", "plan.strategy": "progressive",
     "plan.window_size": 3, "plan.tau": 15, "plan.stride": 1})
PRESETS["flowpo_flash"] = Preset(
    "flowpo's frozen-window combination: flowpo_best's credit and sample reuse trained only in a frozen window "
    "over the 5 noisiest steps, DPM-Solver++ 2M after it (r̃=0.4, as MixGRPO-Flash), learning rate 1e-3",
    "this project (docs/methods.md)",
    {**PRESETS["flowpo_best"].overrides, "plan.kind": "sliding_window", "plan.strategy": "frozen",
     "plan.window_size": 5, "solver.kind": "dpm2m", "solver.compression": 0.4, "train.lr": 1e-3})
PRESETS["flowpo_flash2"] = Preset(
    "flowpo_flash with 3 clipped passes per iteration and the learning rate decayed from 1e-3 to 1e-4 "
    "along a cosine over train.iterations (stable past the target)",
    "this project (docs/methods.md)",
    {**PRESETS["flowpo_flash"].overrides, "train.inner_epochs": 3, "train.lr_schedule": "cosine",
     "train.lr_final": 0.1})
_MIX = PRESETS["mix_grpo"].overrides
PRESETS["flowpo_mix"] = Preset(
    "flowpo's cheap combination: MixGRPO's 2-step progressive window (ODE outside) + OP-GRPO replay (k=1, "
    "sequence-level IS, truncation) + 3 clipped passes per iteration + per-group advantage std, learning "
    "rate 1e-3 decayed along a cosine to 1e-4 over train.iterations",
    "this project (docs/methods.md)",
    {**_MIX, **_OP_REPLAY_V1, "advantage.std": "group",
     "train.inner_epochs": 3, "train.lr": 1e-3, "train.lr_schedule": "cosine", "train.lr_final": 0.1})
_P16 = {"sample.prompts_per_iteration": 16}  # flowpo_mix_p16's batch, also given to its controls
PRESETS["flowpo_mix_p16"] = Preset(
    "flowpo_mix with 16 prompts per iteration (128 samples, twice the seed presets'): fewer iterations to "
    "a target at about twice the cost of an iteration; for when a round of rollouts and rewards is the cost",
    "this project (docs/methods.md)",
    {**PRESETS["flowpo_mix"].overrides, **_P16})
# Issue 29's combinations on the likelihood-free successors, designed before they ran (BENCHMARKS §1):
# tuned, DiffusionNFT and AWM lead every GRPO-family preset on `heavy`; what flowpo adds on top of
# them is sample reuse (replay of each prompt's best final sample, which such an objective weights
# like a fresh row: no importance weight, no truncation) and a learning rate decayed along a cosine
# (so the tuned peak can be higher without the late collapse seen at 3e-3).
_DECAY = {"train.lr_schedule": "cosine", "train.lr_final": 0.1}
_REPLAY_AND_DECAY = {"replay.k": 1, "replay.capacity_per_prompt": 1, "replay.rule": "beats_best_or_no_spread",
                     "replay.is_correction": "none", "replay.truncate": "none", **_DECAY}
PRESETS["flowpo_nft"] = Preset(
    "flowpo's combination on DiffusionNFT: its objective and rollouts + replay of each prompt's best final "
    "sample (k=1, no importance weight or truncation: the objective has no likelihood) + the learning rate "
    "decayed along a cosine to a tenth",
    "this project (docs/methods.md)",
    {**PRESETS["diffusion_nft"].overrides, **_REPLAY_AND_DECAY})
PRESETS["flowpo_awm"] = Preset(
    "flowpo's combination on AWM: its objective, plan and rollouts + replay of each prompt's best final sample "
    "(k=1, no importance weight or truncation) + the learning rate decayed along a cosine to a tenth",
    "this project (docs/methods.md)",
    {**PRESETS["awm"].overrides, **_REPLAY_AND_DECAY})
# Stepwise credit reaches the `heavy` target first but falls back at its constant rate; the decay
# alone is added, so the race measures that one part (benchmarks/search.md, designed before it ran).
PRESETS["flowpo_stepwise"] = Preset(
    "flowpo's combination on Stepwise-Flow-GRPO: its DDIM-inspired SDE and Tweedie per-step credit (T'=5) "
    "unchanged + the learning rate decayed along a cosine to a tenth",
    "this project (docs/methods.md)",
    {**_SW, **_DECAY})
PRESETS.update({
    "flowpo_flash_lr3e4": Preset("flowpo_flash ablation: the seed methods' learning rate 3e-4", "ablation",
                                 {**PRESETS["flowpo_flash"].overrides, "train.lr": 3e-4}, "flowpo_flash"),
    "mix_grpo_lr1e3": Preset("MixGRPO control: the seed preset at flowpo_mix's starting learning rate 1e-3 "
                             "(constant, one pass)", "ablation", {**_MIX, "train.lr": 1e-3}, "mix_grpo"),
    "flow_grpo_p16": Preset("Flow-GRPO control: 16 prompts per iteration (flowpo_mix_p16's batch)", "ablation",
                            {**PRESETS["flow_grpo"].overrides, **_P16}, "flow_grpo"),
    "mix_grpo_p16": Preset("MixGRPO control: 16 prompts per iteration (flowpo_mix_p16's batch)", "ablation",
                           {**_MIX, **_P16}, "mix_grpo"),
    "dance_grpo_rows": Preset("DanceGRPO, the update forwarding only the rows that train each step "
                              "(loss.forward_rows=trained)", "ablation",
                              {**PRESETS["dance_grpo"].overrides, "loss.forward_rows": "trained"}, "dance_grpo"),
    "op_grpo_no_is": Preset("OP-GRPO ablation: no importance correction", "ablation", {**_OP, "replay.is_correction": "none"},
                            "op_grpo"),
    "op_grpo_per_step_is": Preset("OP-GRPO ablation: per-step instead of sequence-level importance weights", "ablation",
                                  {**_OP, "replay.is_correction": "per_step"}, "op_grpo"),
    "op_grpo_no_trunc": Preset("OP-GRPO ablation: no late-step truncation of replayed steps", "ablation",
                               {**_OP, "replay.truncate": "none"}, "op_grpo"),
    "op_grpo_adaptive": Preset("OP-GRPO ablation: the adaptive rule (replay only if it beats the group's best "
                               "or the group has no spread) instead of always", "ablation",
                               {**_OP, "replay.rule": "beats_best_or_no_spread"}, "op_grpo"),
    "op_grpo_no_regen": Preset("OP-GRPO ablation: drop the truncated replayed tail instead of regenerating it "
                               "(the stored reward is the advantage's)", "ablation",
                               {**_OP, "replay.tail": "drop"}, "op_grpo"),
    "op_grpo_iter_age": Preset("OP-GRPO ablation: entries age in iterations instead of their prompt's visits",
                               "ablation", {**_OP, "replay.age_unit": "iterations"}, "op_grpo"),
    "op_grpo_sum_is": Preset("OP-GRPO ablation: the sequence weight on the full (sum-reduced) density, clipped "
                             "to [1/2, 2]", "ablation", {**_OP, "replay.is_density": "sum"}, "op_grpo"),
    "awm_random_subset": Preset("AWM ablation: a random half of the usable steps per sample (σ = 1 included; the "
                                "preset's first σ selection) instead of the authors' stratified plan", "ablation",
                                {**PRESETS["awm"].overrides, "plan.kind": "random_subset", "plan.subset_fraction": 0.5},
                                "awm"),
    "mix_grpo_flash_restart": Preset("MixGRPO-Flash ablation: ⌈n·r̃⌉ post-window steps, the solver restarted at "
                                     "first order (flowpo's first reading of the paper)", "ablation",
                                     {**PRESETS["mix_grpo_flash"].overrides, "solver.step_rule": "ceil",
                                      "solver.warm_start": False}, "mix_grpo_flash"),
    "flow_grpo_fast_cps": Preset("Flow-GRPO-Fast as in flow_grpo's no-CFG configs (2025-10): CPS (a=0.8), a random "
                                 "3-step window of the first half, per-sample initial noise, clip 1e-5", "ablation",
                                 {"sample.kernel": "cps", "sample.noise_level": 0.8, "plan.kind": "random_window",
                                  "plan.window_size": 3, "plan.window_min": 3, "plan.window_range": 0.5,
                                  "loss.clip_range": 1e-5}, "flow_grpo_fast"),
    "stepwise_grpo_per_step": Preset("Stepwise ablation: per-step instead of joint gain normalisation", "ablation",
                                     {**_SW, "advantage.normalize": "per_step"}, "stepwise_grpo"),
})


def methods() -> list[str]:
    """The presets that are methods (not ablation variants)."""
    return [n for n, p in PRESETS.items() if p.ablation_of is None]
