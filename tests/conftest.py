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


def cli(capsys, *args):
    """`flowpo.cli.main(args)` in this process → (exit code, stdout, stderr)."""
    from flowpo.cli import main

    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line(err: str) -> str:
    """The one `flowpo: error:` line of a failed command (asserts there is exactly one, no traceback)."""
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("flowpo: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]
