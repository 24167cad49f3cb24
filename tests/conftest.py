import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# A budget that runs an iteration of the embedded model in well under a second.
TINY = [
    "train.iterations=2", "sample.steps=4", "sample.prompts_per_iteration=2", "sample.group_size=4",
    "sample.batch_size=4", "eval.prompts=4", "eval.samples_per_prompt=1", "eval.steps=4", "eval.every=1",
    "train.checkpoint_every=1", "log.progress=false", "log.tensorboard=false",
]


@pytest.fixture
def tiny():
    return list(TINY)
