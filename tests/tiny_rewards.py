"""Tiny random-weight reward models, built offline from configs and saved the way the real ones
ship, so the scorers load them through exactly the code path real weights take.

    tiny_clip_folder(tmp_path / "clip")          # CLIPModel + CLIPProcessor folder (PickScore, CLIPScore)
    tiny_aesthetic_head(tmp_path / "head.pth", dim)   # the LAION MLP as a torch pickle state dict
"""
from __future__ import annotations

from pathlib import Path

import torch

from tiny_pipelines import _CLIP_BOS, _CLIP_EOS, clip_tokenizer


def tiny_clip_config(tokenizer, *, image_size: int = 32, patch: int = 8, hidden: int = 32, projection: int = 24,
                     act: str = "quick_gelu"):
    from transformers import CLIPConfig

    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length, hidden_act=act,
                bos_token_id=tokenizer.convert_tokens_to_ids(_CLIP_BOS),
                eos_token_id=tokenizer.convert_tokens_to_ids(_CLIP_EOS),
                pad_token_id=tokenizer.convert_tokens_to_ids(_CLIP_EOS))
    vision = dict(hidden_size=hidden + 8, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image_size, patch_size=patch, hidden_act=act)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection, logit_scale_init_value=2.6592)


def tiny_clip_folder(directory: str | Path, *, image_size: int = 32, seed: int = 0, projection: int = 24) -> str:
    """A CLIPModel + CLIPProcessor (tokenizer and image processor) folder at `directory`."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(seed)
    tok = clip_tokenizer()
    model = CLIPModel(tiny_clip_config(tok, image_size=image_size, projection=projection)).eval()
    with torch.no_grad():
        model.logit_scale.fill_(4.0)
    improc = CLIPImageProcessor(size={"shortest_edge": image_size},
                                crop_size={"height": image_size, "width": image_size})
    directory = Path(directory)
    model.save_pretrained(directory, safe_serialization=True)
    CLIPProcessor(image_processor=improc, tokenizer=tok).save_pretrained(directory)
    return str(directory)


def tiny_aesthetic_head(path: str | Path, dim: int, seed: int = 0) -> str:
    """The LAION aesthetic MLP's state dict (layers.0/2/4/6/7) saved as a torch pickle."""
    g = torch.Generator().manual_seed(seed)
    widths = [dim, 1024, 128, 64, 16, 1]
    sd = {}
    for idx, (a, b) in zip((0, 2, 4, 6, 7), zip(widths, widths[1:])):
        sd[f"layers.{idx}.weight"] = torch.randn(b, a, generator=g) / a ** 0.5
        sd[f"layers.{idx}.bias"] = torch.randn(b, generator=g) * 0.1
    torch.save(sd, str(path))
    return str(path)
