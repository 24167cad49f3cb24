"""`flowpo serve-reward`: any registered or dotted-path scorer behind HTTP (protocol 1,
flowpo.rewards.service), on Starlette + uvicorn.

    flowpo serve-reward --reward pickscore --option pickscore.device=cuda:1 --port 8765
    flowpo serve-reward --reward geneval=my_geneval.service:score --port 8766    # a user's wrapper

Each served name holds one scorer built once with its options; requests to one scorer run one at
a time (a lock: model scorers are not thread-safe), different scorers in parallel. Bodies over
--max-request-mb are refused with 413 before they are read in full. A scorer that raises gives a
500 whose one-line error names it (the client retries a 5xx a bounded number of times); NaN/inf
scores travel as null and the trainer refuses them by name.

Security: binds 127.0.0.1 by default; no pickle, so a request cannot make the server run code
(beyond the scorer the operator chose), and a reply cannot make the trainer run code. There is no
authentication or TLS: to expose a port beyond loopback, put a reverse proxy with TLS and
authentication (or an SSH tunnel / a private network) in front of it (docs/reward_services.md).
"""
from __future__ import annotations

import sys
import threading
import time

from flowpo import __version__
from flowpo.rewards.service import PROTOCOL, ProtocolError, decode_request, json_safe


class _TooLarge(Exception):
    pass


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


def build_app(scorers: dict, max_bytes: int):
    """A Starlette app serving {name: scorer} (scorers from flowpo.rewards.get_scorer)."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    locks = {name: threading.Lock() for name in scorers}

    def fail(code: int, msg: str) -> JSONResponse:
        return JSONResponse({"error": msg}, status_code=code)

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
            return fail(413, f"request body over the limit of {max_bytes / 2**20:g} MiB; send fewer images per "
                             "request (the client's batch_size option) or raise --max-request-mb")
        try:  # decoding a large body in the thread pool keeps /v1/health answering meanwhile
            images, prompts, metadata = await run_in_threadpool(decode_request, body,
                                                                request.headers.get("content-type", ""))
        except ProtocolError as e:
            return fail(e.status, str(e))
        if await request.is_disconnected():  # the client gave up (timed out) meanwhile: do not score for nobody
            return fail(499, "the client disconnected before scoring started")
        try:
            reply = await run_in_threadpool(run, name, images, prompts, metadata)
        except Exception as e:  # noqa: BLE001 - the scorer's failure, as one line, a 500
            msg = str(e).splitlines()[0] if str(e) else ""
            print(f"flowpo serve-reward: {name}: {type(e).__name__}: {msg}", file=sys.stderr, flush=True)
            return fail(500, f"reward {name!r} raised {type(e).__name__}: {msg}"[:500])
        return JSONResponse(reply)

    return Starlette(routes=[Route("/v1/health", health), Route("/v1/version", version),
                             Route("/v1/score/{name:path}", score, methods=["POST"])])


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


def serve(specs: list[str], options: list[str], host: str, port: int, max_request_mb: float,
          log_level: str = "warning") -> int:
    """Build every scorer, then serve until interrupted."""
    try:
        import uvicorn  # noqa: F401
        import starlette  # noqa: F401
    except ImportError:
        from flowpo.errors import ConfigError

        raise ConfigError("flowpo serve-reward needs starlette and uvicorn: pip install 'flowpo[serve]' "
                          "(or pip install starlette uvicorn)") from None
    import uvicorn

    from flowpo.errors import ConfigError
    from flowpo.rewards import get_scorer

    try:
        labels = parse_specs(specs)
        opts = parse_options(options, labels)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if max_request_mb <= 0:
        raise ConfigError(f"--max-request-mb={max_request_mb:g} must be > 0")
    _check_listen(host, port)  # before the scorers load (minutes for a big model)
    scorers = {label: get_scorer(target, **opts.get(label, {})) for label, target in labels.items()}
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"flowpo serve-reward: warning: binding {host}, not loopback; this server has no authentication or "
              "TLS: put an authenticating TLS proxy (or an SSH tunnel) in front of it", file=sys.stderr)
    app = build_app(scorers, int(max_request_mb * 2**20))
    print(f"flowpo serve-reward: serving {sorted(scorers)} on http://{host}:{port} (protocol {PROTOCOL}, "
          f"max request {max_request_mb:g} MiB)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
    return 0
