"""Networks of the embedded default: the flow velocity network and the reward's digit classifier."""
from flowpo.models.classifier import DigitClassifier
from flowpo.models.flow_net import LORA_TARGETS, FlowNet

__all__ = ["DigitClassifier", "FlowNet", "LORA_TARGETS"]
