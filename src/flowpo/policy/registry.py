"""`build_policy(kind, path, **options)`: the one place a `model.kind` string becomes a Policy.

Imports are lazy: diffusers and peft load only when an SD3, FLUX, Qwen-Image or Wan policy is built.

    policy = build_policy("sd3", "/models/stable-diffusion-3.5-medium", dtype="bf16", lora_rank=32)
"""
from __future__ import annotations

import importlib
from typing import Any

from flowpo.policy.base import Policy

# kind → (module, class); sd3/flux/qwen_image/wan load `Class.from_pretrained(path)` from a diffusers folder.
POLICY_KINDS: dict[str, tuple[str, str]] = {
    "embedded": ("flowpo.policy.embedded", "EmbeddedPolicy"),
    "sd3": ("flowpo.policy.sd3", "SD3Policy"),
    "flux": ("flowpo.policy.flux", "FluxPolicy"),
    "wan": ("flowpo.policy.wan", "WanPolicy"),
    "qwen_image": ("flowpo.policy.qwen_image", "QwenImagePolicy"),
    "flux_kontext": ("flowpo.policy.flux_kontext", "FluxKontextPolicy"),
    "qwen_image_edit": ("flowpo.policy.qwen_image_edit", "QwenImageEditPolicy"),
}


def build_policy(kind: str, path: str | None = None, **options: Any) -> Policy:
    """Build the policy for `model.kind`; `options` are the class's keyword arguments.

    sd3 / flux / qwen_image / wan: `<Class>.from_pretrained(path, **options)`, path a local diffusers folder.
    embedded: `EmbeddedPolicy(weights=path, **options)` (path None = the shipped weights).
    """
    if kind not in POLICY_KINDS:
        raise ValueError(f"model.kind={kind!r} is unknown; allowed: {', '.join(sorted(POLICY_KINDS))}")
    module_name, class_name = POLICY_KINDS[kind]
    policy_cls = getattr(importlib.import_module(module_name), class_name)
    if kind == "embedded":
        return policy_cls(weights=path, **options)
    if not path:
        raise ValueError(
            f"model.kind={kind!r} needs model.path: a local diffusers pipeline folder "
            "(the one holding model_index.json)"
        )
    return policy_cls.from_pretrained(path, **options)
