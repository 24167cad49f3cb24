"""Cost of each reward scorer on the CPU at its real input geometry: images per second through
`get_scorer(name)(images, prompts)` and the share of that time spent in the batched tensor
preprocessing (resize, crop or pad, normalise).

The models are random-weight and narrow (the real patch size and input resolution, a 64-wide
2-layer transformer), built offline with the test builders and loaded through the real loading
code, so the preprocessing share is an upper bound of what it is with the real (much wider)
models. `--real-width` adds one row with the real CLIP ViT-L/14 widths (the `aesthetic` /
`clipscore` model, random weights). OCR runs the real RapidOCR engine on rendered text.

    python benchmarks/reward_cost.py --out benchmarks/reward_cost.csv [--real-width]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def _images(n: int, side: int, seed: int = 0) -> torch.Tensor:
    """Smooth random images [n, 3, side, side] in [0, 1] (decoded samples are smooth)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, side // 32, side // 32, generator=g)
    return torch.nn.functional.interpolate(base, size=(side, side), mode="bicubic", align_corners=False).clamp(0, 1)


def _clip_folder(root: Path, *, image: int, patch: int, width: int, layers: int, heads: int, text_width: int,
                 text_layers: int, projection: int, name: str) -> str:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from tiny_pipelines import _CLIP_BOS, _CLIP_EOS, clip_tokenizer

    tok = clip_tokenizer()
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=text_width, intermediate_size=4 * text_width,
                         num_hidden_layers=text_layers, num_attention_heads=max(1, text_width // 64),
                         max_position_embeddings=77, bos_token_id=tok.convert_tokens_to_ids(_CLIP_BOS),
                         eos_token_id=tok.convert_tokens_to_ids(_CLIP_EOS),
                         pad_token_id=tok.convert_tokens_to_ids(_CLIP_EOS)),
        vision_config=dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                           num_attention_heads=heads, image_size=image, patch_size=patch),
        projection_dim=projection)
    torch.manual_seed(0)
    d = root / name
    CLIPModel(cfg).save_pretrained(d, safe_serialization=True)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": image},
                                                     crop_size={"height": image, "width": image}),
                  tokenizer=tok).save_pretrained(d)
    return str(d)


def _hps_files(root: Path) -> dict:
    import test_reward_hps as h

    h.V_WIDTH, h.V_LAYERS, h.PATCH, h.IMAGE, h.T_WIDTH, h.T_LAYERS = 64, 2, 14, 224, 64, 2  # real geometry
    tok = h.openclip_tokenizer()
    tok.save_pretrained(root / "hps_tok")
    return dict(path=h.save_checkpoint(h.openclip_state(len(tok)), root / "hps.pt"), processor_path=str(root / "hps_tok"),
                vision_heads=2, text_heads=2)


def _imagereward_files(root: Path) -> dict:
    import test_reward_imagereward as t

    t.V_WIDTH, t.V_MLP, t.IMAGE, t.PATCH = 64, 256, 224, 16  # real geometry (patch 16, 224 px)
    torch.save(t.source_state_dict(), root / "ir.pt")
    return dict(path=str(root / "ir.pt"), processor_path=t.write_tokenizer(root / "bert"), vision_heads=2,
                text_heads=2)


def _ocr_images(n: int, side: int) -> torch.Tensor:
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    out = []
    for i in range(n):
        img = Image.new("RGB", (side, side), "white")
        ImageDraw.Draw(img).text((side // 8, side // 3), f"FLOWPO {i}", fill="black",
                                 font=ImageFont.load_default(size=side // 8))
        out.append(torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255)
    return torch.stack(out)


CLIP_FAMILY = ("pickscore", "clipscore", "aesthetic")
_PROCESSORS: dict = {}


def _pil_path(images: torch.Tensor, folder: str):
    """The peers' path for comparison: tensor → uint8 PIL images → the saved CLIP image processor."""
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor

    proc = _PROCESSORS.setdefault(folder, AutoProcessor.from_pretrained(folder, local_files_only=True))
    pil = [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for im in images]
    return proc.image_processor(images=pil, return_tensors="pt")["pixel_values"]


def _time(fn, repeats: int) -> float:
    fn()  # warm-up (first-call allocations, lazy init)
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/reward_cost.csv")
    ap.add_argument("--n", type=int, default=16, help="images per call")
    ap.add_argument("--side", type=int, default=512, help="decoded image side in px (SD3.5-M at 512)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--real-width", action="store_true", help="add a CLIP ViT-L/14-width row (slow)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from flowpo.rewards import get_scorer
    from tiny_rewards import tiny_aesthetic_head

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        narrow = dict(width=64, layers=2, heads=2, text_width=64, text_layers=2, projection=64)
        clip14 = _clip_folder(root, image=224, patch=14, name="clip14", **narrow)
        specs = [
            ("pickscore", "narrow", dict(path=clip14)),
            ("clipscore", "narrow", dict(path=clip14)),
            ("aesthetic", "narrow", dict(path=clip14, head=tiny_aesthetic_head(root / "head.pth", 64))),
            ("hpsv2", "narrow", _hps_files(root)),
            ("imagereward", "narrow", _imagereward_files(root)),
        ]
        if args.real_width:
            vitl = _clip_folder(root, image=224, patch=14, width=1024, layers=24, heads=16, text_width=768,
                                text_layers=12, projection=768, name="vitl14")
            specs.append(("aesthetic", "ViT-L/14 width",
                          dict(path=vitl, head=tiny_aesthetic_head(root / "head768.pth", 768))))
        images = _images(args.n, args.side)
        prompts = [f"a photo of a cat number {i}" for i in range(args.n)]
        for name, model, opts in specs:
            s = get_scorer(name, device="cpu", **opts)
            total = _time(lambda: s(images, prompts), args.repeats)
            pre = _time(lambda: s.fn.pixels(images), args.repeats)
            pil = _time(lambda: _pil_path(images, opts["path"]), args.repeats) if name in CLIP_FAMILY else None
            rows.append(dict(scorer=name, model=model, input=f"{args.side}px → {s.fn.size}px",
                             images_per_s=round(args.n / total, 2), preprocess_ms_per_image=round(1e3 * pre / args.n, 3),
                             preprocess_share=round(pre / total, 4),
                             pil_processor_ms_per_image=None if pil is None else round(1e3 * pil / args.n, 3)))
            print(rows[-1], flush=True)
        try:
            s = get_scorer("ocr", threads=args.threads)
        except Exception as e:  # noqa: BLE001 - the extra is optional
            print(f"ocr skipped: {e}")
        else:
            ocr_images = _ocr_images(args.n, args.side)
            ocr_prompts = [f'a sign that says "flowpo {i}"' for i in range(args.n)]
            total = _time(lambda: s(ocr_images, ocr_prompts), args.repeats)
            pre = _time(lambda: (ocr_images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy(),
                        args.repeats)
            rows.append(dict(scorer="ocr", model="RapidOCR PP-OCRv6 (real)", input=f"{args.side}px",
                             images_per_s=round(args.n / total, 2), preprocess_ms_per_image=round(1e3 * pre / args.n, 3),
                             preprocess_share=round(pre / total, 4), pil_processor_ms_per_image=None))
            print(rows[-1], flush=True)
    from flowpo.bench.report import write_csv

    write_csv(Path(args.out), rows)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
