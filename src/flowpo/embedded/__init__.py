"""The embedded default: a 295k-parameter text-to-digit flow model, its prompts, the digit
classifier behind its rewards, the pretraining that made both, and the shipped weights (assets/).
The policy adapter is `flowpo.policy.embedded`; the rewards register under `flowpo.rewards`."""
from flowpo.embedded.classifier import DigitClassifier
from flowpo.embedded.flow_net import LORA_TARGETS, FlowNet

__all__ = ["DigitClassifier", "FlowNet", "LORA_TARGETS"]
