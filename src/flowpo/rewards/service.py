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

Client policy (`Client.call`): a connection error, a timeout, a 5xx, 408 or 429 is retried
`retries` times with exponential backoff (backoff_s · 2^k); another 4xx is not retried; after
the last attempt one error names the URL, the cause and the fix. `timeout_s` bounds each attempt
as a whole (connect, send, the full reply: a watchdog cuts the connection at the deadline), so
the worst-case time of one call is (retries + 1) · timeout_s + backoff_s · (2^retries − 1); keep
it below FLOWPO_DIST_TIMEOUT_S under torchrun so that the other ranks wait for the failing one
and stop with it. A reply over `max_reply_mb` and a redirect (unless asked for and to the same
origin) are refused and not retried.
"""
from __future__ import annotations

import json
import math
import struct
import threading
import time
from dataclasses import dataclass
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
class RewardServiceError(RewardError):
    """A reward service could not be reached or answered wrongly (a runtime failure: exit code 1)."""


class _Fatal(Exception):
    """An answer that retrying cannot fix (a reply over max_reply_mb, a refused redirect): raised
    from the attempt as `error`, past the retry loop."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


class _Expired(Exception):
    """The attempt's deadline passed (the watchdog cut its connection)."""


def _cause(e: BaseException, timeout_s: float) -> str:
    import http.client
    import socket

    if isinstance(e, (_Expired, TimeoutError, socket.timeout)):
        return f"no reply within timeout_s={timeout_s:g}s for the whole exchange: connect, send, the full reply"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused (nothing listens there)"
    if isinstance(e, socket.gaierror):
        return "unknown host"
    if isinstance(e, http.client.RemoteDisconnected):
        return "the server closed the connection without replying"
    if isinstance(e, (ConnectionResetError, BrokenPipeError)):
        return "connection reset by the server"
    if isinstance(e, http.client.IncompleteRead):
        return "the server closed the connection in the middle of its reply"
    return f"{type(e).__name__}: {str(e)[:200]}"


def _error_text(body: bytes, reason: str) -> str:
    try:
        j = json.loads(body)
        if isinstance(j, dict):
            err = j.get("error")
            if isinstance(err, dict):  # OpenAI-style {"error": {"message": ...}}
                err = err.get("message")
            if err:
                return str(err).splitlines()[0][:300]
    except (ValueError, UnicodeDecodeError, RecursionError):
        pass
    text = body.decode("utf-8", "replace").strip() or (reason or "").strip()
    return text.splitlines()[0][:300] if text else "(empty body)"


RESUME_HINT = ("check that the service is running and reachable (raise timeout_s/retries if it is only slow); "
               "the last checkpoint is intact: continue with flowpo train --resume once it is back")
START_HINT = ("start the service (flowpo serve-reward ...) or fix the reward's url option; nothing was run or "
              "written")
MAX_REDIRECTS = 5


def _origin(url: str) -> tuple[str, str, int]:
    from urllib.parse import urlsplit

    p = urlsplit(url)
    return p.scheme.lower(), (p.hostname or "").lower(), p.port or (443 if p.scheme.lower() == "https" else 80)


class Client:
    """Bounded HTTP calls with bounded retries (see the module docstring); thread-safe (no shared
    connection: each attempt opens its own).

    Hard limits, whatever the server does: `timeout_s` bounds one attempt as a whole (connect,
    sending the body, the status line, headers and the full reply), enforced by a watchdog that
    cuts the connection at the deadline, because per-read socket timeouts let a server that
    trickles a byte at a time hold a call forever; a reply over `max_reply_mb` is refused from its
    Content-Length or, streamed, as soon as it passes the limit, never buffered whole; a redirect
    is refused unless `follow_redirects` and it stays on the same scheme, host and port (then at
    most MAX_REDIRECTS hops, within the same attempt's time). It speaks plain http.client, so
    HTTP(S)_PROXY variables are not used: the service is reached directly."""

    def __init__(self, url: str, *, timeout_s: float, retries: int, backoff_s: float, what: str,
                 headers: dict | None = None, max_reply_mb: float = 64.0, follow_redirects: bool = False):
        from urllib.parse import urlsplit

        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"url {url!r} must start with http:// or https://")
        parts = urlsplit(url)
        try:
            parts.port
        except ValueError:
            raise ValueError(f"url {url!r} has a port that is not a number in 0..65535") from None
        if not parts.hostname:
            raise ValueError(f"url {url!r} names no host; write http://HOST:PORT")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                   for v in (timeout_s, backoff_s, max_reply_mb)):
            raise ValueError(f"timeout_s={timeout_s}, backoff_s={backoff_s} and max_reply_mb={max_reply_mb} must be "
                             "finite numbers")
        if timeout_s <= 0 or retries < 0 or backoff_s < 0:
            raise ValueError(f"timeout_s={timeout_s} must be > 0, retries={retries} and backoff_s={backoff_s} >= 0")
        if max_reply_mb <= 0:
            raise ValueError(f"max_reply_mb={max_reply_mb} must be > 0 (MiB; default 64)")
        self.url, self.timeout_s, self.retries, self.backoff_s = url.rstrip("/"), timeout_s, retries, backoff_s
        self.max_reply_bytes, self.follow_redirects = int(max_reply_mb * 2**20), bool(follow_redirects)
        self.what, self.headers = what, dict(headers or {})

    # -------------------------------------------------------------- one exchange
    def _connection(self, url: str, timeout: float):
        import http.client
        from urllib.parse import urlsplit

        p = urlsplit(url)
        if p.scheme.lower() == "https":
            import ssl

            return http.client.HTTPSConnection(p.hostname, p.port, timeout=timeout,
                                               context=ssl.create_default_context())
        return http.client.HTTPConnection(p.hostname, p.port, timeout=timeout)

    def _exchange(self, method: str, url: str, body: bytes | None, headers: dict, deadline: float
                  ) -> tuple[int, str, dict, bytes]:
        """One request and its full reply → (status, reason, headers, body) by `deadline` (monotonic
        seconds) or _Expired; a reply over max_reply_bytes → _Fatal."""
        import http.client
        import socket
        from urllib.parse import urlsplit

        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Expired()
        conn = self._connection(url, remaining)
        expired = threading.Event()

        def cut() -> None:  # wakes a recv/send blocked in the calling thread: it fails at once
            expired.set()
            sock = conn.sock
            if sock is not None:
                try:
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)
                except OSError:
                    pass

        watchdog = threading.Timer(remaining, cut)
        watchdog.daemon = True
        watchdog.start()
        try:
            p = urlsplit(url)
            target = (p.path or "/") + (f"?{p.query}" if p.query else "")
            try:
                conn.connect()  # bounded by the socket timeout (the time left); the watchdog has no socket yet
                if expired.is_set():
                    raise _Expired()
                conn.request(method, target, body=body, headers=headers)
                resp = conn.getresponse()
                declared = resp.getheader("Content-Length")
                if declared is not None and declared.strip().isdigit() and int(declared) > self.max_reply_bytes:
                    raise _Fatal(self._too_large(url, f"declares {int(declared):,} bytes"))
                parts, size = [], 0
                while True:
                    piece = resp.read1(1 << 16)
                    if not piece:
                        break
                    size += len(piece)
                    if size > self.max_reply_bytes:
                        raise _Fatal(self._too_large(url, f"passed {size:,} bytes while streaming"))
                    parts.append(piece)
                if resp.length:  # the connection ended before the declared length
                    raise http.client.IncompleteRead(b"", resp.length)
            except _Fatal:
                raise
            except Exception:
                if expired.is_set():
                    raise _Expired() from None
                raise
            if expired.is_set():  # cut while the last piece was read: the reply may be short
                raise _Expired()
            return resp.status, resp.reason, {k.lower(): v for k, v in resp.getheaders()}, b"".join(parts)
        finally:
            watchdog.cancel()
            conn.close()

    def _too_large(self, url: str, how: str) -> Exception:
        return RewardServiceError(f"{self.what} at {url}: the reply {how}, over max_reply_mb="
                                  f"{self.max_reply_bytes / 2**20:g} MiB; refused without reading the rest (not "
                                  "retried): check the url points at the service, or raise the reward's "
                                  "max_reply_mb option")

    def _redirect(self, url: str, status: int, location: str | None) -> str:
        """The URL a redirect leads to when it may be followed, else _Fatal naming the fix."""
        from urllib.parse import urljoin

        from flowpo.rewards.loading import RewardOptionError

        if not location:
            raise _Fatal(RewardServiceError(f"{self.what} at {url}: HTTP {status} without a Location; not a flowpo "
                                            "reward service? check the url option"))
        target = urljoin(url, location)
        if _origin(target) != _origin(self.url):
            raise _Fatal(RewardOptionError(
                f"{self.what} at {url} redirected (HTTP {status}) to {target[:200]}, another origin (scheme, host or "
                "port); redirects leaving the configured origin are never followed: point the reward's url option "
                "at the service itself"))
        if not self.follow_redirects:
            raise _Fatal(RewardOptionError(
                f"{self.what} at {url} redirected (HTTP {status}) to {target[:200]}; redirects are not followed "
                "unless asked: point the reward's url option at the final address, or set its follow_redirects "
                "option to true (same-origin redirects only)"))
        return target

    def _attempt(self, method: str, url: str, body: bytes | None, headers: dict) -> tuple[int, str, bytes, str]:
        """One attempt, redirects included, within timeout_s → (status, reason, body, final URL)."""
        deadline = time.monotonic() + self.timeout_s
        for _ in range(MAX_REDIRECTS + 1):
            status, reason, rheaders, data = self._exchange(method, url, body, headers, deadline)
            if status not in (301, 302, 303, 307, 308):
                return status, reason, data, url
            url = self._redirect(url, status, rheaders.get("location"))
        raise _Fatal(RewardServiceError(f"{self.what} at {self.url}: more than {MAX_REDIRECTS} redirects; point the "
                                        "reward's url option at the final address"))

    # -------------------------------------------------------------- a call
    def call(self, method: str, path: str, *, data: bytes | None = None, json_body: Any = None,
             content_type: str | None = None, hint: str = RESUME_HINT) -> Any:
        """One request with the retry policy → the reply's parsed JSON. `hint`: what to do after
        the last failed attempt."""
        import http.client

        from flowpo import __version__

        url = self.url + path
        headers = {"User-Agent": f"flowpo/{__version__}", "Accept": "application/json", **self.headers}
        if json_body is not None:
            data, content_type = json.dumps(json_body).encode(), "application/json"
        if content_type:
            headers["Content-Type"] = content_type
        t0, cause = time.monotonic(), ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                status, reason, body, final = self._attempt(method, url, data, headers)
            except _Fatal as e:
                raise e.error from None
            except (_Expired, OSError, http.client.HTTPException) as e:  # refused, reset, cut, a bad status line
                cause = _cause(e, self.timeout_s)
                continue
            if status < 300:
                try:
                    return json.loads(body)
                except (ValueError, UnicodeDecodeError, RecursionError):
                    text = body[:120].decode("utf-8", "replace")
                    raise RewardServiceError(f"{self.what} at {final}: malformed reply (HTTP {status}, not JSON: "
                                             f"{text!r}); check the URL points at the service") from None
            cause = f"HTTP {status}: {_error_text(body, reason)}"
            if status == 413:
                from flowpo.rewards.loading import RewardOptionError

                raise RewardOptionError(f"{self.what} at {final} refused the request as too large ({cause}); lower "
                                        "the reward's batch_size option or raise the server's limit it names")
            if status < 500 and status not in (408, 429):
                raise RewardServiceError(f"{self.what} at {final} refused the request ({cause}); not retried: "
                                         "fix the request or the service's configuration")
        raise RewardServiceError(f"{self.what} at {url}: {cause} (after {self.retries + 1} attempts in "
                                 f"{time.monotonic() - t0:.1f}s); {hint}")
