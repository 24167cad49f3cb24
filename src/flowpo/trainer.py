"""`flowpo.trainer` is `flowpo.training.trainer` (the name before the training subpackage)."""
from flowpo.training.trainer import Trainer, evaluate_policy, train  # noqa: F401
