"""The reward-service wire format (protocol 1): requests, replies, PNG images and their limits.

Protocol 1 (`flowpo serve-reward`, flowpo.rewards.server):

    GET  /v1/health           → {"status": "ok", "protocol": 1, "flowpo": "<version>", "rewards": [names]}
    GET  /v1/version          → {"protocol": 1, "flowpo": "<version>", "torch": "<version>"}
    POST /v1/score/<reward>   body, either
        application/x-safetensors: one tensor "images", uint8 [N, C, H, W] (0..255) or float16/32
            in [0, 1] (videos [N, C, F, H, W]); the safetensors header metadata holds
            {"flowpo": JSON {"protocol": 1, "prompts": [N str], "metadata": [N dict]}}
        application/json: {"prompts": [...], "metadata": [...], "images_png": [N base64 PNG]}
            (for clients in other languages; PNG is 8-bit, lossless)
      → 200 {"scores": [N float | null], "detail": {field: [N float | null]}, "seconds": s}
      → 4xx/5xx {"error": "one line"}: 400 a malformed request, 404 an unknown reward,
        413 a body over the size limit, 415 another content type, 499 the client left before
        scoring started, 500 the scorer raised.

No pickle anywhere: safetensors and JSON only, so neither side can make the other run code. A
non-finite score travels as null and the trainer refuses it by name (RewardSet). Images are never
JPEG-compressed: uint8 is exactly the image a PIL/PNG pipeline output holds; float32 keeps the
decoder's values bit for bit.

The HTTP client both remote scorers share is `flowpo.rewards.client`.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import torch

from flowpo.rewards import RewardError
from flowpo.rewards.preprocess import to_uint8

PROTOCOL = 1
SAFETENSORS = "application/x-safetensors"
WIRE_DTYPES = {"uint8": torch.uint8, "float16": torch.float16, "float32": torch.float32}


class RewardServiceError(RewardError):
    """A reward service could not be reached or answered wrongly (a runtime failure: exit code 1)."""


class ProtocolError(ValueError):
    """A request that does not follow protocol 1: the server answers `status` (400; 415 for
    another content type)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def from_wire(images: torch.Tensor) -> torch.Tensor:
    """uint8 → float32 x/255; floats → float32 (the scorer's input convention)."""
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    if images.dtype in (torch.float16, torch.bfloat16, torch.float32):
        return images.float()
    raise ProtocolError(f"images have dtype {images.dtype}; send uint8, float16 or float32")


@dataclass(frozen=True)
class Limits:
    """What one request may decode to, checked from the PNG / safetensors headers before any pixel
    is decoded: a few KB of compressed PNG can claim gigabytes of pixels, so the body size limit
    alone does not bound the server's memory. A pixel is one position of one frame (a video of F
    frames of H×W counts F·H·W), whatever its channels; the server holds it as float32, so a request
    at `pixels_per_request` holds about pixels × channels × 4 bytes (0.8 GB for RGB at the default).
    Each limit is refused with 413 naming the serve-reward option that sets it."""

    pixels_per_image: int = 4096 * 4096          # one 4096² image, or 16 frames of 1024²
    pixels_per_request: int = 64 * 1024 * 1024   # 64 images of 1024²
    images_per_request: int = 4096

    def check_count(self, n: int) -> None:
        """n images in one request → ProtocolError(413) when over images_per_request."""
        if n > self.images_per_request:
            raise ProtocolError(f"{n} images in one request is over --max-images-per-request="
                                f"{self.images_per_request}; send fewer per request (the client's batch_size "
                                "option) or raise the server's limit", 413)

    def check(self, sizes: list[tuple[int, ...]], repeat: int = 1) -> None:
        """sizes: each image's (H, W) or (F, H, W) as its header claims, the list standing for
        `repeat` copies of itself (a safetensors batch: one shape for all) → ProtocolError(413)
        naming the first limit it is over."""
        self.check_count(len(sizes) * repeat)
        total = 0
        for i, size in enumerate(sizes):
            px = math.prod(size)
            if px > self.pixels_per_image:
                shape = f"{size[-1]}x{size[-2]}" + (f" in {size[0]} frames" if len(size) == 3 else "")
                which = "each image" if repeat > 1 or len(sizes) == 1 else f"image {i}"
                raise ProtocolError(f"{which} is {shape} = {px:,} pixels, over --max-pixels-per-image="
                                    f"{self.pixels_per_image:,}; send smaller images or raise the server's limit",
                                    413)
            total += px
        total *= repeat
        if total > self.pixels_per_request:
            raise ProtocolError(f"{len(sizes) * repeat} images of {total:,} pixels in all is over "
                                f"--max-pixels-per-request={self.pixels_per_request:,}; send fewer per request "
                                "(the client's batch_size option) or raise the server's limit", 413)


def _json(text: bytes | str, what: str) -> Any:
    """json.loads with every failure a ProtocolError; nesting deeper than the parser's recursion
    limit is one of them (a 400, not the server's RecursionError)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ProtocolError(f"{what} nests deeper than the parser allows; send flat JSON (lists of strings "
                            "and of objects)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"{what} is not JSON ({str(e)[:200]})") from None


# ---------------------------------------------------------------------- request bodies
def encode_request(images: torch.Tensor, prompts: list[str], metadata: list[dict], dtype: str = "uint8") -> bytes:
    from safetensors.torch import save

    wire = to_uint8(images) if dtype == "uint8" else images.detach().to("cpu", WIRE_DTYPES[dtype])
    head = json.dumps({"protocol": PROTOCOL, "prompts": list(prompts), "metadata": [dict(m) for m in metadata]})
    return save({"images": wire.contiguous().cpu()}, metadata={"flowpo": head})


def _safetensors_header(body: bytes) -> dict:
    if len(body) < 8:
        raise ProtocolError("the body is not a safetensors file (shorter than its 8-byte header size)")
    (n,) = struct.unpack("<Q", body[:8])
    if n > len(body) - 8:
        raise ProtocolError(f"the safetensors header claims {n} bytes but the body has {len(body) - 8}")
    header = _json(body[8:8 + n], "the safetensors header")
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__", {}), dict):
        raise ProtocolError("the safetensors header must be an object whose __metadata__ is an object")
    return header


def _check_lists(n: int, prompts: Any, metadata: Any) -> tuple[list[str], list[dict]]:
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ProtocolError("'prompts' must be a list of strings")
    if metadata is None:
        metadata = [{} for _ in prompts]
    if not isinstance(metadata, list) or not all(isinstance(m, dict) for m in metadata):
        raise ProtocolError("'metadata' must be a list of objects (one per image)")
    if not (len(prompts) == len(metadata) == n):
        raise ProtocolError(f"{n} images but {len(prompts)} prompts and {len(metadata)} metadata entries; "
                            "send one of each per image")
    return prompts, metadata


def _declared_shape(header: dict) -> list[int]:
    """The shape the safetensors header declares for 'images' (read before the tensor is)."""
    info = header.get("images")
    shape = info.get("shape") if isinstance(info, dict) else None
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise ProtocolError("the safetensors header must describe a tensor 'images' with a shape of "
                            "non-negative integers")
    if len(shape) not in (4, 5):
        raise ProtocolError(f"images must be [N, C, H, W] or [N, C, F, H, W], got shape {tuple(shape)}")
    return shape


def decode_request(body: bytes, content_type: str, limits: Limits | None = None
                   ) -> tuple[torch.Tensor, list[str], list[dict]]:
    """A request body → (float images [N, C, ...] in [0, 1], prompts, metadata); ProtocolError if
    malformed (400), over `limits` (413, checked from the headers before decoding) or of another
    content type (415)."""
    limits = limits or Limits()
    ctype = content_type.split(";")[0].strip().lower()
    if ctype == SAFETENSORS:
        from safetensors.torch import load

        header = _safetensors_header(body)
        head = header["__metadata__"].get("flowpo") if isinstance(header.get("__metadata__"), dict) else None
        if head is None:
            raise ProtocolError("the safetensors header has no 'flowpo' metadata entry (prompts, metadata)")
        head = _json(head, "the 'flowpo' metadata entry") if isinstance(head, str) else head
        shape = _declared_shape(header)
        limits.check([tuple(shape[2:])], repeat=shape[0])
        try:
            tensors = load(body)
        except Exception as e:  # noqa: BLE001 - any parse failure is the client's: a 400
            raise ProtocolError(f"unreadable safetensors body ({type(e).__name__}: {str(e)[:200]})") from None
        if not isinstance(head, dict):
            raise ProtocolError("the 'flowpo' metadata entry must be a JSON object (protocol, prompts, metadata)")
        if head.get("protocol") != PROTOCOL:
            raise ProtocolError(f"protocol {head.get('protocol')!r} requested; this server speaks {PROTOCOL}")
        if set(tensors) != {"images"}:
            raise ProtocolError(f"the body must hold exactly one tensor 'images', got {sorted(tensors)}")
        images = tensors["images"]
        if images.ndim not in (4, 5):
            raise ProtocolError(f"images must be [N, C, H, W] or [N, C, F, H, W], got shape {tuple(images.shape)}")
        prompts, metadata = _check_lists(images.shape[0], head.get("prompts"), head.get("metadata"))
        return from_wire(images), prompts, metadata
    if ctype == "application/json":
        req = _json(body, "the body")
        if not isinstance(req, dict) or not isinstance(req.get("images_png"), list):
            raise ProtocolError("a JSON request needs 'images_png': [base64 PNG, ...], 'prompts' and 'metadata'")
        limits.check_count(len(req["images_png"]))  # before base64-decoding any
        raws = [_png_bytes(s) for s in req["images_png"]]
        sizes = [png_size(r) for r in raws]
        limits.check(sizes)
        if len(set(sizes)) > 1:
            raise ProtocolError(f"the PNGs differ in size ({sorted(set(sizes))[:4]} as (H, W)); send images of one "
                                "shape per request")
        pngs = [_decode_png_bytes(r) for r in raws]
        if len({tuple(p.shape) for p in pngs}) > 1:
            raise ProtocolError(f"the PNGs differ in size or mode ({sorted({tuple(p.shape) for p in pngs})}); send "
                                "images of one shape per request")
        images = torch.stack(pngs) if pngs else torch.zeros(0, 3, 1, 1)
        prompts, metadata = _check_lists(images.shape[0], req.get("prompts"), req.get("metadata"))
        return images, prompts, metadata
    raise ProtocolError(f"content type {content_type!r} is not served; send {SAFETENSORS} or application/json", 415)


def encode_png(image: torch.Tensor) -> str:
    """One float image [C, H, W] in [0, 1] → base64 PNG (8-bit RGB or L)."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    a = to_uint8(image).cpu().numpy()
    a = a[0] if a.shape[0] == 1 else np.ascontiguousarray(a[:3].transpose(1, 2, 0))
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_bytes(data: Any) -> bytes:
    """One 'images_png' entry (base64 text) → the PNG file's bytes (not decoded)."""
    import base64
    import binascii

    if not isinstance(data, str):
        raise ProtocolError("'images_png' entries must be base64 strings")
    try:
        return base64.b64decode(data, validate=True)
    except (ValueError, binascii.Error) as e:
        raise ProtocolError(f"an 'images_png' entry is not base64 ({e})") from None


def png_size(raw: bytes) -> tuple[int, int]:
    """(height, width) from a PNG's IHDR chunk, the first 24 bytes: what decoding it would
    allocate, known before any of it is decoded."""
    if raw[:8] != PNG_SIGNATURE:
        kind = "JPEG" if raw[:3] == b"\xff\xd8\xff" else "another format"
        raise ProtocolError(f"an 'images_png' entry is {kind}, not PNG (lossless images only)")
    if len(raw) < 24 or raw[12:16] != b"IHDR":
        raise ProtocolError("an 'images_png' entry is a PNG without its IHDR header (truncated or malformed)")
    width, height = struct.unpack(">II", raw[16:24])
    return height, width


def _decode_png_bytes(raw: bytes) -> torch.Tensor:
    import io

    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(raw))
        if img.format != "PNG":
            raise ProtocolError(f"an 'images_png' entry is {img.format}, not PNG (lossless images only)")
        img = img.convert("RGB") if img.mode not in ("L", "RGB") else img
        a = np.asarray(img)
    except Image.DecompressionBombError as e:  # PIL's own cap, when the server's is set above it
        raise ProtocolError(f"an 'images_png' entry is refused by PIL's decompression-bomb limit ({e})", 413) from None
    except (ValueError, UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ProtocolError(f"an 'images_png' entry is not a valid PNG ({str(e)[:200]})") from None
    t = torch.from_numpy(a.copy())
    t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
    return t.float() / 255.0


def decode_png(data: Any, limits: Limits | None = None) -> torch.Tensor:
    """One base64 PNG → float [C, H, W] in [0, 1]; its size checked against `limits` before decoding."""
    raw = _png_bytes(data)
    (limits or Limits()).check([png_size(raw)])
    return _decode_png_bytes(raw)


def decode_reply(data: Any, n: int, url: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A reply body (parsed JSON) → (scores [n], {field: [n]}); null → NaN (refused downstream)."""
    def column(v, what):
        if not isinstance(v, list) or len(v) != n or not all(
                x is None or (isinstance(x, (int, float)) and not isinstance(x, bool)) for x in v):
            raise RewardServiceError(f"{url}: malformed reply: {what} must be a list of {n} numbers "
                                     f"(got {str(v)[:120]}); is this a flowpo reward service of protocol {PROTOCOL}?")
        return torch.tensor([float("nan") if x is None else float(x) for x in v], dtype=torch.float32)

    if not isinstance(data, dict) or "scores" not in data:
        raise RewardServiceError(f"{url}: malformed reply: no 'scores' in {str(data)[:120]!r}; is this a flowpo "
                                 f"reward service of protocol {PROTOCOL}?")
    detail = data.get("detail") or {}
    if not isinstance(detail, dict) or "scores" in detail:
        raise RewardServiceError(f"{url}: malformed reply: 'detail' must be an object of per-image lists, without "
                                 "a field named 'scores'")
    return column(data["scores"], "'scores'"), {str(k): column(v, f"detail {k!r}") for k, v in sorted(detail.items())}


def json_safe(values: torch.Tensor) -> list:
    """[N] floats → a JSON list with null for NaN/inf (strict JSON has no NaN)."""
    return [float(x) if torch.isfinite(x) else None for x in values.detach().float().reshape(-1).cpu()]


# ---------------------------------------------------------------------- client
