"""Prompt sets with per-prompt metadata, for training (`sample.prompts_file`) and evaluation
(`eval.prompts_file`).

Formats, chosen by the file's suffix:
    .txt    one prompt per line (blank lines skipped); metadata {} for each.
    .jsonl  one JSON object per line with a string field `prompt`; every other field is that
            prompt's metadata, passed unchanged to the rewards (`fn(images, prompts, metadata)`),
            kept with replayed trajectories, and written into the evaluation records. GenEval's
            `evaluation_metadata.jsonl` (`prompt`, `tag`, `include`, `exclude`) loads as it is.
            Editing: `image` (one path) or `images` (a list of paths), relative to the file, name
            the row's source images. They are checked here (each opens as an image) and stored as
            metadata `images`: a list of absolute paths, which the editing policies encode (once
            per prompt, flowpo.policy.edit) and the edit rewards compare the result with.

A missing, empty or malformed file, or a source image that is missing or does not open, stops
with one line naming the file (and the line).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from flowpo.errors import ConfigError


@dataclass
class PromptSet:
    """Parallel lists: texts[i] and its metadata meta[i] (a dict, possibly empty)."""

    texts: list[str]
    meta: list[dict] = field(default_factory=list)

    def __post_init__(self):
        if not self.meta:
            self.meta = [{} for _ in self.texts]
        if len(self.meta) != len(self.texts):
            raise ValueError(f"{len(self.texts)} prompts but {len(self.meta)} metadata records")

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> str:
        return self.texts[i]

    def take(self, idx) -> "PromptSet":
        """The prompts at positions `idx` (ints or a tensor of them), with their metadata."""
        idx = [int(i) for i in idx]
        return PromptSet([self.texts[i] for i in idx], [self.meta[i] for i in idx])


def read_prompt_file(path: str, key: str) -> PromptSet:
    """`key` names the config key in the messages (sample.prompts_file / eval.prompts_file)."""
    f = Path(path)
    fmt = "a .txt file with one prompt per line or a .jsonl file with a 'prompt' field per line"
    if not f.exists():
        raise ConfigError(f"{key}={path!r} does not exist; give {fmt}")
    if not f.is_file():
        raise ConfigError(f"{key}={path!r} is a directory, not a file; give {fmt}")
    try:
        text = f.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is not part of a prompt
    except UnicodeDecodeError:
        raise ConfigError(f"{key}={path!r} is not UTF-8 text; give {fmt}") from None
    if f.suffix.lower() == ".jsonl":
        out = _read_jsonl(text, path, key)
    else:
        out = PromptSet([ln.strip() for ln in text.splitlines() if ln.strip()])
    if not len(out):
        raise ConfigError(f"{key}={path!r} holds no prompts (empty or blank lines only); give {fmt}")
    return out


def _read_jsonl(text: str, path: str, key: str) -> PromptSet:
    texts, meta = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{key}={path!r} line {n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where} is not valid JSON ({e.msg} at column {e.colno}); write one JSON object "
                              "per line") from None
        if not isinstance(rec, dict):
            raise ConfigError(f"{where} is a JSON {type(rec).__name__}, not an object; write "
                              '{"prompt": "...", ...} per line')
        p = rec.pop("prompt", None)
        if not isinstance(p, str) or not p.strip():
            raise ConfigError(f"{where} has no non-empty string field 'prompt' (fields: {sorted(rec) or 'none'})")
        if "image" in rec or "images" in rec:
            rec["images"] = _source_images(rec, Path(path).parent, where)
            rec.pop("image", None)
        texts.append(p.strip())
        meta.append(rec)
    return PromptSet(texts, meta)


def _source_images(rec: dict, root: Path, where: str) -> list[str]:
    """The row's `image` / `images` as absolute paths, each checked to open as an image."""
    if "image" in rec and "images" in rec:
        raise ConfigError(f"{where} has both 'image' and 'images'; give one (a path, or a list of paths)")
    given = rec["image"] if "image" in rec else rec["images"]
    paths = [given] if "image" in rec else given
    if not isinstance(paths, list) or not paths or not all(isinstance(q, str) and q.strip() for q in paths):
        raise ConfigError(f"{where}: {'image' if 'image' in rec else 'images'}={given!r} must be "
                          "a path (image) or a non-empty list of paths (images), relative to the prompts file")
    out = []
    for q in paths:
        f = (root / q).resolve()
        if not f.is_file():
            raise ConfigError(f"{where}: source image {q!r} ({f}) does not exist; paths are relative to the "
                              "prompts file")
        try:
            from PIL import Image

            with Image.open(f) as im:
                im.verify()
        except Exception as e:  # PIL raises many kinds for a file that is not an image
            raise ConfigError(f"{where}: source image {q!r} ({f}) does not open as an image "
                              f"({type(e).__name__}); give a PNG/JPEG/WebP file") from None
        out.append(str(f))
    return out
