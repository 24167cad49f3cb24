"""Image editing as a task: the source images of a prompt row, from the prompt file to the policy.

A `.jsonl` prompt row may name source images (`image` / `images`, flowpo.prompts); its metadata
then holds `images`, a list of absolute paths. An editing policy (`edits = True`: flux_kontext,
qwen_image_edit) conditions on them: `encode_rows` hands it each row's paths, and it encodes each
(prompt, images) pair once (its prompt cache is keyed by both), so a group's rows and the update's
re-encoded replayed rows reuse one encoding. Any other policy ignores them; the rewards still see
them in metadata (flowpo.rewards.edit compares the result with its source).

Source images enter the policies as PIL images (what the diffusers pipelines' own image
processors take), read once per encoding by `open_source`.
"""
from __future__ import annotations

from flowpo.errors import ConfigError
from flowpo.policy.base import Cond

BLANK = ""  # the path of a blank (mid-grey) source: the shape-only row of an empty lock-step call


def edits(policy) -> bool:
    """Whether `policy` conditions on source images."""
    return bool(getattr(policy, "edits", False))


def kind_edits(kind: str) -> bool:
    """Whether `model.kind` is an editing policy (its class, imported without loading a model)."""
    import importlib

    from flowpo.policy.registry import POLICY_KINDS

    if kind not in POLICY_KINDS:
        return False
    module, name = POLICY_KINDS[kind]
    return bool(getattr(getattr(importlib.import_module(module), name), "edits", False))


def check_sources(kind: str, prompts, key: str) -> None:
    """Before the model loads: every row of `prompts` (a PromptSet from `key`) names a source
    image when `model.kind` edits, else one line naming the key."""
    if kind_edits(kind):
        row_images(prompts.meta, len(prompts), kind, f"{key}: " if key else "")


def row_images(metadata: list[dict] | None, n: int, kind: str, where: str = "") -> list[tuple[str, ...]]:
    """Each row's source image paths (a tuple), or one line saying the rows have none."""
    metadata = metadata if metadata is not None else [{}] * n
    out = [tuple(m.get("images") or ()) for m in metadata]
    missing = [i for i, imgs in enumerate(out) if not imgs]
    if missing:
        raise ConfigError(f"{where}model.kind={kind!r} edits images, but {len(missing)} of {n} prompt rows name no source "
                          "image; give a .jsonl prompts file whose rows have 'image' (a path) or 'images' "
                          "(a list of paths), relative to the file (flowpo sample: --image PATH)")
    return out


def encode_rows(policy, prompts: list[str], metadata: list[dict] | None = None) -> Cond:
    """The policy's conditioning of rows (prompt, metadata): `encode_prompts(prompts)`, or, for an
    editing policy, `encode_prompts(prompts, images)` with each row's source image paths."""
    if not edits(policy):
        return policy.encode_prompts(prompts)
    return policy.encode_prompts(prompts, row_images(metadata, len(prompts), getattr(policy, "model_kind", "?")))


def open_source(path: str, size: tuple[int, int] | None = None):
    """The source image at `path` as an RGB PIL image (`BLANK`: mid-grey of `size` (w, h))."""
    from PIL import Image

    if path == BLANK:
        return Image.new("RGB", size or (64, 64), (128, 128, 128))
    with Image.open(path) as im:
        return im.convert("RGB")


def check_layouts(policy, sets: list[tuple[str, object]]) -> None:
    """After the model loads, before training: every row of the prompt sets [(key, PromptSet)]
    gives the editing policy's `source_layout` (its sources' sizes, from the image headers) of the
    first row, since rows of one call are stacked; else one line naming both prompts."""
    if not edits(policy):
        return
    first = None
    for key, prompts in sets:
        for text, meta in zip(prompts.texts, prompts.meta):
            layout = policy.source_layout(tuple(meta.get("images") or ()))
            if first is None:
                first = (layout, key, text)
            elif layout != first[0]:
                raise ConfigError(f"{key}: the sources of {text!r} give the model {layout}, but those of "
                                  f"{first[2]!r} ({first[1]}) give {first[0]}: rows are batched together, so every "
                                  "row needs the same number of sources with the same aspect ratio "
                                  "(resize them beforehand, or set model.image_resolution)")
