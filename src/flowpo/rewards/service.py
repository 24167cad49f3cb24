"""The reward-service wire format and the HTTP client both remote scorers share.

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

Client policy (`request`): a connection error, a timeout, a 5xx, 408 or 429 is retried
`retries` times with exponential backoff (backoff_s · 2^k); another 4xx is not retried; after
the last attempt one error names the URL, the cause and the fix. Worst-case time of one call:
(retries + 1) · timeout_s + backoff_s · (2^retries − 1); keep it below FLOWPO_DIST_TIMEOUT_S
under torchrun so that the other ranks wait for the failing one and stop with it.
"""
from __future__ import annotations

import json
import struct
import threading
import time
from typing import Any

import torch

from flowpo.rewards import RewardError
from flowpo.rewards.preprocess import to_uint8

PROTOCOL = 1
SAFETENSORS = "application/x-safetensors"
WIRE_DTYPES = {"uint8": torch.uint8, "float16": torch.float16, "float32": torch.float32}


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
    try:
        header = json.loads(body[8:8 + n])
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"the safetensors header is not JSON ({e})") from None
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


def decode_request(body: bytes, content_type: str) -> tuple[torch.Tensor, list[str], list[dict]]:
    """A request body → (float images [N, C, ...] in [0, 1], prompts, metadata); ProtocolError if malformed."""
    ctype = content_type.split(";")[0].strip().lower()
    if ctype == SAFETENSORS:
        from safetensors.torch import load

        head = _safetensors_header(body).get("__metadata__", {}).get("flowpo")
        if head is None:
            raise ProtocolError("the safetensors header has no 'flowpo' metadata entry (prompts, metadata)")
        try:
            head = json.loads(head)
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
        try:
            req = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise ProtocolError(f"the body is not JSON ({e})") from None
        if not isinstance(req, dict) or not isinstance(req.get("images_png"), list):
            raise ProtocolError("a JSON request needs 'images_png': [base64 PNG, ...], 'prompts' and 'metadata'")
        pngs = [decode_png(s) for s in req["images_png"]]
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


def decode_png(data: Any) -> torch.Tensor:
    import base64
    import io

    import numpy as np
    from PIL import Image, UnidentifiedImageError

    if not isinstance(data, str):
        raise ProtocolError("'images_png' entries must be base64 strings")
    try:
        img = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        if img.format != "PNG":
            raise ProtocolError(f"an 'images_png' entry is {img.format}, not PNG (lossless images only)")
        img = img.convert("RGB") if img.mode not in ("L", "RGB") else img
        a = np.asarray(img)
    except (ValueError, UnidentifiedImageError, OSError) as e:
        raise ProtocolError(f"an 'images_png' entry is not a base64 PNG ({e})") from None
    t = torch.from_numpy(a.copy())
    t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
    return t.float() / 255.0


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
class RewardServiceError(RewardError):
    """A reward service could not be reached or answered wrongly (a runtime failure: exit code 1)."""


def _cause(e: Exception, timeout_s: float) -> str:
    import requests

    text = str(e)
    if isinstance(e, requests.Timeout):
        return f"no reply within timeout_s={timeout_s:g}s"
    for marker, say in (("Connection refused", "connection refused (nothing listens there)"),
                        ("Connection reset", "connection reset by the server"),
                        ("RemoteDisconnected", "the server closed the connection without replying"),
                        ("Name or service not known", "unknown host"),
                        ("Failed to resolve", "unknown host")):
        if marker in text:
            return say
    return f"{type(e).__name__}: {text[:200]}"


def _error_text(r) -> str:
    try:
        j = r.json()
        if isinstance(j, dict):
            err = j.get("error")
            if isinstance(err, dict):  # OpenAI-style {"error": {"message": ...}}
                err = err.get("message")
            if err:
                return str(err).splitlines()[0][:300]
    except ValueError:
        pass
    text = (r.text or "").strip() or (r.reason or "").strip()
    return text.splitlines()[0][:300] if text else "(empty body)"


RESUME_HINT = ("check that the service is running and reachable (raise timeout_s/retries if it is only slow); "
               "the last checkpoint is intact: continue with flowpo train --resume once it is back")
START_HINT = ("start the service (flowpo serve-reward ...) or fix the reward's url option; nothing was run or "
              "written")


class Client:
    """Bounded retries over HTTP (see the module docstring). Thread-safe: one session per thread."""

    def __init__(self, url: str, *, timeout_s: float, retries: int, backoff_s: float, what: str,
                 headers: dict | None = None):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url {url!r} must start with http:// or https://")
        if timeout_s <= 0 or retries < 0 or backoff_s < 0:
            raise ValueError(f"timeout_s={timeout_s} must be > 0, retries={retries} and backoff_s={backoff_s} >= 0")
        self.url, self.timeout_s, self.retries, self.backoff_s = url.rstrip("/"), timeout_s, retries, backoff_s
        self.what, self.headers = what, dict(headers or {})
        self._local = threading.local()

    def _session(self):
        import requests

        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = requests.Session()
            s.headers.update(self.headers)
        return s

    def call(self, method: str, path: str, *, data: bytes | None = None, json_body: Any = None,
             content_type: str | None = None, hint: str = RESUME_HINT) -> Any:
        """One request with the retry policy → the reply's parsed JSON. `hint`: what to do after
        the last failed attempt."""
        import requests

        url = self.url + path
        headers = {"Content-Type": content_type} if content_type else {}
        t0, cause = time.monotonic(), ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                r = self._session().request(method, url, data=data, json=json_body, headers=headers,
                                            timeout=self.timeout_s)
            except (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema,
                    requests.exceptions.MissingSchema) as e:
                from flowpo.rewards.loading import RewardOptionError

                raise RewardOptionError(f"{self.what}: {url} is not a usable URL ({e}); fix the reward's url "
                                        "option") from None
            except requests.RequestException as e:
                cause = _cause(e, self.timeout_s)
                continue
            if r.status_code < 400:
                try:
                    return r.json()
                except ValueError:
                    raise RewardServiceError(f"{self.what} at {url}: malformed reply (HTTP {r.status_code}, not JSON: "
                                             f"{r.text[:120]!r}); check the URL points at the service") from None
            cause = f"HTTP {r.status_code}: {_error_text(r)}"
            if r.status_code == 413:
                from flowpo.rewards.loading import RewardOptionError

                raise RewardOptionError(f"{self.what} at {url} refused the request as too large ({cause}); lower "
                                        "the reward's batch_size option or raise the server's --max-request-mb")
            if r.status_code < 500 and r.status_code not in (408, 429):
                raise RewardServiceError(f"{self.what} at {url} refused the request ({cause}); not retried: "
                                         "fix the request or the service's configuration")
        raise RewardServiceError(f"{self.what} at {url}: {cause} (after {self.retries + 1} attempts in "
                                 f"{time.monotonic() - t0:.1f}s); {hint}")
