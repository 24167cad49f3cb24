"""The HTTP client both remote scorers share (`remote`, `vlm_judge`): bounded calls to a reward
service (the wire format is flowpo.rewards.service).

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
import threading
import time
from typing import Any

from flowpo.rewards.service import RewardServiceError


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
