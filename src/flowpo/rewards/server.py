"""`flowpo serve-reward`: any registered or dotted-path scorer behind HTTP (protocol 1,
flowpo.rewards.service), on Starlette + uvicorn.

    flowpo serve-reward --reward pickscore --option pickscore.device=cuda:1 --port 8765
    flowpo serve-reward --reward geneval=my_geneval.service:score --port 8766    # a user's wrapper

Each served name holds one scorer built once with its options; requests to one scorer run one at
a time (a lock: model scorers are not thread-safe), different scorers in parallel. Bodies over
--max-request-mb are refused with 413 before they are read in full; images over the pixel limits
(--max-pixels-per-image, --max-pixels-per-request, --max-images-per-request) with 413 from their
PNG / safetensors headers, before any pixel is decoded. A scorer that raises gives a 500 whose
one-line error names it (the client retries a 5xx a bounded number of times); NaN/inf scores
travel as null and the trainer refuses them by name. Every answer, errors included, is JSON: an
unknown path is a JSON 404, a failure of the server's own code a JSON 500 and one log line. A
client that leaves mid-body is one log line, not a traceback, and at most one such line per
kind every LOG_EVERY_S seconds (the next line counts those left out), so a flood of them cannot
fill the log.

Security: binds 127.0.0.1 by default; no pickle, so a request cannot make the server run code
(beyond the scorer the operator chose), and a reply cannot make the trainer run code. There is no
authentication or TLS: to expose a port beyond loopback, put a reverse proxy with TLS and
authentication (or an SSH tunnel / a private network) in front of it (docs/reward_services.md).
"""
from __future__ import annotations

import math
import sys
import threading
import time

from flowpo import __version__
from flowpo.rewards.service import PROTOCOL, Limits, ProtocolError, decode_request, json_safe

LOG_EVERY_S = 10.0


class _TooLarge(Exception):
    pass


class ThrottledLog:
    """One stderr line per event, but at most one per `kind` every `every_s` seconds; the lines
    left out meanwhile are counted in the next one of that kind. For events a client can cause at
    will (leaving mid-body, an input that trips a bug): a log that a flood cannot fill."""

    def __init__(self, every_s: float = LOG_EVERY_S, stream=None):
        self.every_s, self.stream = every_s, stream
        self._last: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def __call__(self, kind: str, line: str) -> bool:
        """Write `line` (True) or count it as left out (False)."""
        now = time.monotonic()
        with self._lock:
            last, skipped = self._last.get(kind, (-math.inf, 0))
            if now - last < self.every_s:
                self._last[kind] = (last, skipped + 1)
                return False
            self._last[kind] = (now, 0)
        more = f" (and {skipped} more like it in the last {now - last:.0f}s)" if skipped else ""
        print(f"flowpo serve-reward: {line}{more}", file=self.stream or sys.stderr, flush=True)
        return True


def parse_specs(specs: list[str]) -> dict[str, str]:
    """--reward values (`NAME` or `LABEL=TARGET`) → {served name: scorer name or dotted path}."""
    out: dict[str, str] = {}
    for spec in specs:
        label, _, target = spec.partition("=") if "=" in spec else (spec, "", spec)
        label, target = label.strip(), target.strip()
        if not label or not target or "/" in label:
            raise ValueError(f"--reward {spec!r}: give NAME or LABEL=NAME (a registered reward or package.module:fn; "
                             "a label has no '/')")
        if label in out:
            raise ValueError(f"--reward {label!r} is given twice; give each served name once")
        out[label] = target
    return out


def parse_options(items: list[str], labels: dict[str, str]) -> dict[str, dict]:
    """--option LABEL.KEY=VALUE (YAML value) → {label: {key: value}}."""
    import yaml

    out: dict[str, dict] = {}
    for item in items:
        key, eq, value = item.partition("=")
        label, dot, opt = key.strip().rpartition(".")
        if not eq or not dot or not label or not opt:
            raise ValueError(f"--option {item!r}: write LABEL.KEY=VALUE, e.g. --option pickscore.device=cuda:1")
        if label not in labels:
            raise ValueError(f"--option {item!r}: {label!r} is not served; served: {sorted(labels)}")
        try:
            parsed = yaml.safe_load(value) if value.strip() else value
        except yaml.YAMLError:
            parsed = value
        out.setdefault(label, {})[opt] = parsed
    return out


def build_app(scorers: dict, max_bytes: int, limits: Limits | None = None, log: ThrottledLog | None = None):
    """A Starlette app serving {name: scorer} (scorers from flowpo.rewards.get_scorer): request
    bodies up to `max_bytes`, images within `limits`; `log` takes the lines of client events."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    import asyncio

    limits, log = limits or Limits(), log or ThrottledLog()
    locks = {name: threading.Lock() for name in scorers}
    # one request per reward decodes and scores at a time; the others wait holding only their bodies,
    # so the decoded images in memory are at most one request's worth (the pixel limits) per reward
    turns = {name: asyncio.Lock() for name in scorers}

    def fail(code: int, msg: str) -> JSONResponse:
        return JSONResponse({"error": msg}, status_code=code)

    def guarded(endpoint):
        """The endpoint with every failure of its own answered as JSON: a client gone mid-body is
        one (throttled) log line; anything unexpected a 500 and one (throttled) line, never
        Starlette's plain-text 500 and uvicorn's traceback."""
        async def wrapped(request: Request) -> JSONResponse:
            try:
                return await endpoint(request)
            except ClientDisconnect:
                log("disconnect", f"a client at {_peer(request)} left before sending its whole request body; "
                                  "nothing was scored")
                return fail(499, "the client disconnected before sending its whole body")
            except Exception as e:  # noqa: BLE001 - the server's own failure: a JSON 500, the server lives on
                msg = (str(e).splitlines() or [""])[0][:300]
                log("internal", f"{request.method} {request.url.path}: unexpected {type(e).__name__}: {msg} "
                                "(answered 500; please report it)")
                return fail(500, f"the server failed on this request ({type(e).__name__}: {msg}); please report it")
        return wrapped

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:  # 404 path, 405 method
        what = {404: f"no endpoint {request.url.path!r}; endpoints: GET /v1/health, GET /v1/version, "
                     "POST /v1/score/<reward>",
                405: f"{request.method} is not allowed on {request.url.path!r}; score with POST /v1/score/<reward>"}
        return fail(exc.status_code, what.get(exc.status_code, str(exc.detail)))

    async def health(_request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "protocol": PROTOCOL, "flowpo": __version__, "rewards": sorted(scorers)})

    async def version(_request: Request) -> JSONResponse:
        import torch

        return JSONResponse({"protocol": PROTOCOL, "flowpo": __version__, "torch": torch.__version__})

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            raise _TooLarge()
        parts, size = [], 0
        async for piece in request.stream():
            size += len(piece)
            if size > max_bytes:
                raise _TooLarge()
            parts.append(piece)
        return b"".join(parts)

    def run(name, images, prompts, metadata):
        t0 = time.perf_counter()
        with locks[name]:
            scores, detail = scorers[name].detailed(images, prompts, metadata)
        if scores.numel() != images.shape[0]:
            raise RuntimeError(f"returned {scores.numel()} scores for {images.shape[0]} images")
        return {"scores": json_safe(scores), "detail": {k: json_safe(v) for k, v in detail.items()},
                "seconds": time.perf_counter() - t0}

    async def score(request: Request) -> JSONResponse:
        name = request.path_params["name"]
        if name not in scorers:
            return fail(404, f"reward {name!r} is not served here; served: {sorted(scorers)}")
        try:
            body = await read_body(request)
        except _TooLarge:
            return fail(413, f"request body over the limit of {max_bytes / 2**20:g} MiB (--max-request-mb); send "
                             "fewer images per request (the client's batch_size option) or raise --max-request-mb")
        async with turns[name]:
            try:  # decoding a large body in the thread pool keeps /v1/health answering meanwhile
                images, prompts, metadata = await run_in_threadpool(decode_request, body,
                                                                    request.headers.get("content-type", ""), limits)
            except ProtocolError as e:
                return fail(e.status, str(e))
            if await request.is_disconnected():  # the client gave up (timed out) meanwhile: do not score for nobody
                log("gone", f"a client at {_peer(request)} left before its request was scored (its timeout?)")
                return fail(499, "the client disconnected before scoring started")
            try:
                reply = await run_in_threadpool(run, name, images, prompts, metadata)
            except Exception as e:  # noqa: BLE001 - the scorer's failure, as one line, a 500
                msg = str(e).splitlines()[0] if str(e) else ""
                print(f"flowpo serve-reward: {name}: {type(e).__name__}: {msg}", file=sys.stderr, flush=True)
                return fail(500, f"reward {name!r} raised {type(e).__name__}: {msg}"[:500])
        return JSONResponse(reply)

    return Starlette(routes=[Route("/v1/health", guarded(health)), Route("/v1/version", guarded(version)),
                             Route("/v1/score/{name:path}", guarded(score), methods=["POST"])],
                     exception_handlers={HTTPException: http_error})


def _peer(request) -> str:
    client = request.client
    return f"{client.host}:{client.port}" if client else "(unknown address)"


def _check_listen(host: str, port: int) -> None:
    """One line now, instead of uvicorn's log after the models have loaded, when host:port cannot be bound."""
    import socket

    from flowpo.errors import ConfigError

    if not 0 < port < 65536:
        raise ConfigError(f"--port {port} is not a TCP port; give 1..65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ConfigError(f"--host {host!r} does not resolve ({e.strerror}); give an address such as 127.0.0.1") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port or stop the "
                              "process that holds it") from None


def _served_syntax(message: str, labels: dict[str, str]) -> str:
    """A scorer's advice in train's syntax (reward.options.NAME.KEY=…, or reward.options.<name>.KEY)
    → serve-reward's own (--option LABEL.KEY=…), so that the line names what to type here."""
    import re

    for label, target in labels.items():
        for name in (re.escape(target), re.escape(label), "<name>"):
            message = re.sub(r"reward\.options\." + name + r"\.(\w+)", lambda m: f"--option {label}.{m[1]}", message)
    return message


def check_limits(max_request_mb: float, limits: Limits) -> None:
    """Every size limit a finite number > 0, or one line naming the option (exit code 2)."""
    from flowpo.errors import ConfigError

    if not (isinstance(max_request_mb, (int, float)) and math.isfinite(max_request_mb) and max_request_mb > 0):
        raise ConfigError(f"--max-request-mb={max_request_mb} must be a finite number of MiB > 0, e.g. 256")
    if max_request_mb * 2**20 >= 2**53:
        raise ConfigError(f"--max-request-mb={max_request_mb:g} is beyond any body this server could hold; give "
                          "at most a few thousand MiB")
    for field, flag in (("pixels_per_image", "--max-pixels-per-image"), ("pixels_per_request", "--max-pixels-per-request"),
                        ("images_per_request", "--max-images-per-request")):
        value = getattr(limits, field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{flag}={value} must be a whole number >= 1 (default {getattr(Limits(), field)})")


def serve(specs: list[str], options: list[str], host: str, port: int, max_request_mb: float,
          log_level: str = "warning", limits: Limits | None = None) -> int:
    """Build every scorer, then serve until interrupted."""
    from flowpo.errors import ConfigError

    limits = limits or Limits()
    check_limits(max_request_mb, limits)  # bad values first: before imports, the port and the models
    try:
        import uvicorn  # noqa: F401
        import starlette  # noqa: F401
    except ImportError:
        raise ConfigError("flowpo serve-reward needs starlette and uvicorn: pip install 'flowpo[serve]' "
                          "(or pip install starlette uvicorn)") from None
    import uvicorn

    from flowpo.rewards import get_scorer

    try:
        labels = parse_specs(specs)
        opts = parse_options(options, labels)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check_listen(host, port)  # before the scorers load (minutes for a big model)
    scorers = {}
    for label, target in labels.items():
        try:
            scorers[label] = get_scorer(target, **opts.get(label, {}))
        except ConfigError as e:  # the scorer's advice, in this command's syntax
            raise type(e)(_served_syntax(str(e), {label: target})) from None
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"flowpo serve-reward: warning: binding {host}, not loopback; this server has no authentication or "
              "TLS: put an authenticating TLS proxy (or an SSH tunnel) in front of it", file=sys.stderr)
    from PIL import Image

    # PIL's own decompression-bomb check (warn above MAX_IMAGE_PIXELS, refuse above twice that) follows
    # this server's limit, which is checked first from the PNG header; this process only serves.
    Image.MAX_IMAGE_PIXELS = limits.pixels_per_image
    app = build_app(scorers, int(max_request_mb * 2**20), limits)
    print(f"flowpo serve-reward: serving {sorted(scorers)} on http://{host}:{port} (protocol {PROTOCOL}, "
          f"max request {max_request_mb:g} MiB, {limits.images_per_request} images, "
          f"{limits.pixels_per_request:,} pixels; {limits.pixels_per_image:,} pixels per image)",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
    return 0
