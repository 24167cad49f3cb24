"""Parameter and LoRA counts of the 2026 transformers (docs/gpu.md §7), on the meta device: no weights,
no compute. Z-Image and FLUX.2 [dev] are the diffusers classes' default configs (the released ones);
the Wan2.2 A14B expert is Wan2.1-14B's config (each of the two experts has it).

    PYTHONPATH=src python benchmarks/param_counts_2026.py
"""
import torch
from accelerate import init_empty_weights
from diffusers import Flux2Transformer2DModel, WanTransformer3DModel, ZImageTransformer2DModel

from flowpo.policy.flux2 import FLUX2_LORA_TARGETS
from flowpo.policy.wan import WAN_LORA_TARGETS
from flowpo.policy.zimage import ZIMAGE_LORA_TARGETS


def count(model, targets, rank):
    """(parameters in B, LoRA parameters in M at `rank` on the target linears)."""
    lora = sum(rank * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and any(name.endswith("." + t) for t in targets))
    return sum(p.numel() for p in model.parameters()) / 1e9, lora / 1e6


with init_empty_weights():
    models = {
        "Z-Image": (ZImageTransformer2DModel(), ZIMAGE_LORA_TARGETS),
        "FLUX.2 [dev]": (Flux2Transformer2DModel(), FLUX2_LORA_TARGETS),
        "Wan2.2 A14B, one expert": (WanTransformer3DModel(
            num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
            freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True, qk_norm="rms_norm_across_heads"),
            WAN_LORA_TARGETS),
    }
for name, (model, targets) in models.items():
    params, lora = count(model, targets, 64)
    print(f"{name}: {params:.2f} B parameters, LoRA r 64 on the default targets: {lora:.1f} M")
