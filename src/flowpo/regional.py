"""Regional compilation of a policy's transformer (`model.compile`).

torch.compile on each repeated block rather than on the whole model (the PyTorch recipe
"regional compilation", what diffusers' `compile_repeated_blocks` does): the blocks share code, so
compile time grows with the number of distinct block shapes, not with depth, and the code around
the blocks (embeddings, RoPE, CFG, the step kernels) stays eager. Each block is compiled in place
(`nn.Module.compile`), so LoRA adapters, FSDP2's per-block hooks (applied before), `state_dict`
names and checkpoints are unchanged. Shapes are compiled dynamic from the start: the rollout, the
update and the evaluation call the blocks with different batch sizes, and a static graph per size
would recompile each time. After the first iteration (grad and no-grad graphs, adapters on and
off for the KL reference) nothing recompiles (`tests/test_regional.py` counts it).

Outputs match eager up to the fused kernels' rounding (inductor reorders float sums): on the
CPU, flow_grpo's weights after 4 iterations of the embedded model with CFG differ from eager's by
2.6e-7 (benchmarks/compile_check.py); compiling its 5 blocks took 35 s of the first iteration.
"""
from __future__ import annotations

import torch
from torch import nn

BLOCKS = {
    # class names of the repeated blocks of each transformer flowpo wraps
    "FlowNet": ("ResBlock",),
    "SD3Transformer2DModel": ("JointTransformerBlock",),
    "FluxTransformer2DModel": ("FluxTransformerBlock", "FluxSingleTransformerBlock"),
    "QwenImageTransformer2DModel": ("QwenImageTransformerBlock",),
    "WanTransformer3DModel": ("WanTransformerBlock",),
    "ExpertPair": ("WanTransformerBlock",),  # Wan2.2's two experts (flowpo.policy.wan22)
    "ZImageTransformer2DModel": ("ZImageTransformerBlock",),
    "Flux2Transformer2DModel": ("Flux2TransformerBlock", "Flux2SingleTransformerBlock"),
}


def block_names(module: nn.Module) -> tuple[str, ...]:
    """The repeated blocks of `module`: BLOCKS by its class, else the model's own `_repeated_blocks`
    (diffusers' attribute for regional compilation)."""
    inner = getattr(module, "module", module)  # a DDP wrapper's model
    return BLOCKS.get(type(inner).__name__) or tuple(getattr(inner, "_repeated_blocks", ()) or ())


def compile_blocks(module: nn.Module, *, mode: str | None = None, backend: str = "inductor") -> int:
    """torch.compile every repeated block of `module` in place → the number of blocks compiled.
    Raises ValueError when the model has none flowpo knows (name them in BLOCKS). backend="eager"
    traces without generating code (the tests' fast check of the recompilation count)."""
    names = block_names(module)
    blocks = [m for m in module.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"model.compile: no repeated blocks known for {type(module).__name__}; "
                         "set model.compile=false (or add its block class to flowpo.regional.BLOCKS)")
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for b in blocks:
        b.compile(dynamic=True, mode=mode, backend=backend)
    return len(blocks)


def compiled_frames() -> int:
    """Frames dynamo has compiled so far in this process (a recompilation adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["frames"]["ok"])
