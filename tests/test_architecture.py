"""The package's shape (issue 28): no import circle anywhere (function-level imports count), no part
imports the training loop's package, the loop stays short and branches on no part's flag."""
import ast
from pathlib import Path

import flowpo

SRC = Path(flowpo.__file__).parent
TOP = ("flowpo.cli", "flowpo.bench", "flowpo.training", "flowpo.build", "flowpo.__main__")  # the house's top floors


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in SRC.rglob("*.py")}


def _imports(path: Path, mods: dict[str, Path]) -> set[str]:
    """Every flowpo module `path` imports, at any depth (functions, TYPE_CHECKING blocks)."""
    out = set()
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("flowpo")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if not base.startswith("flowpo"):
                continue
            for a in node.names:  # `from pkg import submodule` imports the submodule
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base)
    return {m for m in out if m in mods and m != name}


def test_no_import_circle():
    mods = _modules()
    graph = {m: _imports(p, mods) for m, p in mods.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import circles: " + "; ".join(" → ".join(c) for c in cycles)


def test_no_part_imports_the_training_package():
    mods = _modules()
    offenders = [(m, sorted(n for n in _imports(p, mods) if n.startswith("flowpo.training")))
                 for m, p in mods.items() if not m.startswith(TOP)]
    assert not [o for o in offenders if o[1]], offenders


def test_the_loop_is_short_and_reads_top_to_bottom():
    src = (SRC / "training" / "trainer.py").read_text()
    assert len(src.splitlines()) <= 250
    tree = ast.parse(src)
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "train_iteration")
    assert fn.end_lineno - fn.lineno + 1 <= 60
    # no branch on a config flag or a part's presence in the iteration
    assert not [n for n in ast.walk(fn) if isinstance(n, (ast.If, ast.IfExp))]


def _update_conversions(tmp_path, tiny, steps: int, preset: str, *extra: str, own: bool = False) -> int:
    """Tensor → Python conversions (host syncs on a GPU) inside one iteration's update. own: only
    those flowpo's code makes, with its `.cpu()` copies (not torch's, e.g. AdamW's host-side step
    counters)."""
    import os
    import sys
    import collections
    import contextlib

    import torch

    from flowpo import config
    from flowpo.training.trainer import Trainer

    cfg = config.load(None, preset, tiny + [f"sample.steps={steps}", "train.minibatches=1", "eval.every=0", *extra])
    tr = Trainer(cfg, tmp_path / f"{preset}_{steps}_{len(extra)}")
    tr.train_iteration(0)
    counts = collections.Counter()
    names = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__") + (("cpu",) if own else ())
    originals = {n: getattr(torch.Tensor, n) for n in names}
    mine = f"{os.sep}flowpo{os.sep}"

    def wrap(fn):
        def counted(self, *a, **k):
            if not own or mine in sys._getframe(1).f_code.co_filename:
                counts["n"] += 1
            return fn(self, *a, **k)
        return counted

    update = tr._update

    def counted_update(b):
        with contextlib.ExitStack() as stack:
            for n, fn in originals.items():
                setattr(torch.Tensor, n, wrap(fn))
                stack.callback(setattr, torch.Tensor, n, fn)
            return update(b)

    tr._update = counted_update
    tr.iteration = 1
    rec = tr.train_iteration(1)
    assert rec["train/optimizer_steps"] == 1.0
    return counts["n"]


import pytest  # noqa: E402


@pytest.mark.parametrize("preset", ["flow_grpo", "awm"])
def test_the_update_syncs_the_host_per_chunk_not_per_chunk_and_step(tmp_path, tiny, preset):
    # The typed tensor stats: twice the trained steps (same chunks, one optimizer step) make no more
    # tensor → Python conversions in the update (before: 6 per (chunk, step), benchmarks/host_syncs.py)
    assert _update_conversions(tmp_path, tiny, 4, preset) == _update_conversions(tmp_path, tiny, 8, preset)


@pytest.mark.parametrize("preset", ["flow_grpo", "op_grpo", "awm"])
def test_the_update_stalls_once_per_optimizer_step_plus_a_constant(tmp_path, tiny, preset):
    """flowpo's own device→host points in the update: the same for 2 or 4 chunks and 4 or 8 steps
    (one copy of the per-chunk trained steps, the gradient norm per optimizer step, one copy of the
    stats; benchmarks/host_syncs.py lists them)."""
    counts = {(s, b): _update_conversions(tmp_path, tiny, s, preset, f"sample.batch_size={b}", own=True)
              for s in (4, 8) for b in (2, 4)}
    assert len(set(counts.values())) == 1 and counts[(4, 4)] <= 8, counts
