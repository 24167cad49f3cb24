"""flowpo: GRPO-family RL post-training for flow-matching generators.

Every method (Flow-GRPO, DanceGRPO, MixGRPO, MixGRPO-Flash, OP-GRPO, Stepwise-Flow-GRPO) is a
preset wiring a few parts: kernel, solver, plan, rollout, rewards, advantage, buffer, loss,
trainer, policy. See README.md and docs/.
"""

__version__ = "0.1.0"
