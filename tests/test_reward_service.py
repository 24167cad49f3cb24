"""Reward services: `flowpo serve-reward` in a real process on 127.0.0.1, the `remote` and
`vlm_judge` scorers, overlapped scoring, and the faults (down at start, killed mid-run, slow,
malformed, 4xx, NaN, one rank failing)."""
from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
import torch
from safetensors.torch import load_file

from conftest import TINY, cli, one_line
from flowpo import config
from flowpo.errors import ConfigError
from flowpo.rewards import RewardError, RewardSet, get_scorer
from flowpo.rewards.preprocess import to_uint8
from flowpo.rewards.service import SAFETENSORS, RewardServiceError, encode_request
from flowpo.training.trainer import Trainer

TESTS = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m flowpo serve-reward` in a subprocess; waits until /v1/health answers."""

    def __init__(self, *rewards: str, port: int | None = None, extra=(), env=None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "flowpo", "serve-reward", "--port", str(self.port), *extra]
        for r in rewards:
            cmd += ["--reward", r]
        full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
                    "OMP_NUM_THREADS": "1", **(env or {})}
        # the log goes to a file (a pipe nobody reads would block a chatty server), read by log()
        self._log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        self.proc = subprocess.Popen(cmd, env=full_env, stdout=self._log, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 90
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited: {self.log()}")
            try:
                if requests.get(self.url + "/v1/health", timeout=1).ok:
                    return
            except requests.RequestException:
                time.sleep(0.2)
        self.kill()
        raise AssertionError("the server did not come up in 90 s")

    def log(self) -> str:
        """Everything the server has written to stdout and stderr so far."""
        return Path(self._log.name).read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self._log.close()
        Path(self._log.name).unlink(missing_ok=True)


# small pixel limits for the shared server: 64x64 per image, 40,000 pixels (51 of 28x28) and 64 images a request
SMALL_LIMITS = ["--max-pixels-per-image", "4096", "--max-pixels-per-request", "40000",
                "--max-images-per-request", "64"]


@pytest.fixture(scope="module")
def server():
    s = Server("rowwise=service_scorers:rowwise", "digits=digit_alignment", "nan=service_scorers:nan_scorer",
               "raises=service_scorers:raises", "jittery=service_scorers:jittery",
               extra=["--max-request-mb", "1", *SMALL_LIMITS])
    yield s
    s.kill()


def _images(n=6, seed=0):
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


PROMPTS = [f"a handwritten {i % 10}" for i in range(6)]
META = [{"target": i % 10} for i in range(6)]


# ---------------------------------------------------------------------- the server and the remote scorer
def test_health_version_and_remote_scores_equal_local_scores(server):
    h = requests.get(server.url + "/v1/health", timeout=5).json()
    assert h["status"] == "ok" and h["protocol"] == 1 and "rowwise" in h["rewards"]
    v = requests.get(server.url + "/v1/version", timeout=5).json()
    assert v["protocol"] == 1 and v["torch"] == torch.__version__
    x = _images()
    local = get_scorer("digit_alignment")
    exact = get_scorer("remote", url=server.url, reward="digits", dtype="float32")
    assert torch.equal(exact(x, PROMPTS, META), local(x, PROMPTS, META))          # float32: bit for bit
    as_png = get_scorer("remote", url=server.url, reward="digits")                 # uint8 (the default)
    assert torch.equal(as_png(x, PROMPTS, META), local(to_uint8(x).float() / 255, PROMPTS, META))
    scores, detail = get_scorer("remote", url=server.url, reward="rowwise").detailed(x, PROMPTS, META)
    assert torch.equal(detail["target"], torch.tensor([float(m["target"]) for m in META]))  # metadata reached it
    # the JSON + PNG form (for clients in other languages) gives the uint8 scores
    from flowpo.rewards.service import encode_png

    body = {"prompts": PROMPTS, "metadata": META, "images_png": [encode_png(im) for im in x]}
    r = requests.post(server.url + "/v1/score/rowwise", json=body, timeout=10).json()
    assert torch.allclose(torch.tensor(r["scores"]), scores, atol=1e-6)


def test_remote_with_batch_size_sends_several_requests_and_keeps_the_order(server):
    x = _images(7, seed=1)
    p, m = [f"p{i}" for i in range(7)], [{"target": i} for i in range(7)]
    whole = get_scorer("remote", url=server.url, reward="rowwise")
    split = get_scorer("remote", url=server.url, reward="rowwise", batch_size=3)
    a, da = whole.detailed(x, p, m)
    b, db = split.detailed(x, p, m)
    assert torch.equal(a, b) and torch.equal(da["target"], db["target"]) and db["target"].tolist() == list(range(7))


@pytest.mark.parametrize("body, ctype, code, words", [
    (b"not a safetensors file", SAFETENSORS, 400, "safetensors"),
    (b'{"prompts": ["a"]}', "application/json", 400, "images_png"),
    (b"\x80\x04\x95 pickle bytes", "application/octet-stream", 415, "content type"),
    (b"x" * (2 * 2**20), SAFETENSORS, 413, "MiB"),
])
def test_bad_requests_get_a_4xx_withone_line(server, body, ctype, code, words):
    r = requests.post(server.url + "/v1/score/rowwise", data=body, headers={"Content-Type": ctype}, timeout=10)
    assert r.status_code == code and words in r.json()["error"] and "\n" not in r.json()["error"]


def _b64(img, fmt):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", img).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def _safetensors_with_header(header: bytes) -> bytes:
    import struct

    return struct.pack("<Q", len(header)) + header


@pytest.mark.parametrize("body, ctype, words", [
    (_safetensors_with_header(b"[1, 2]"), SAFETENSORS, "must be an object"),
    (_safetensors_with_header(b'{"__metadata__": null}'), SAFETENSORS, "must be an object"),
    (json.dumps({"prompts": ["a", "b"], "metadata": [{}, {}],
                 "images_png": [_b64((8, 8), "PNG"), _b64((4, 4), "PNG")]}).encode(), "application/json", "differ"),
    (json.dumps({"prompts": ["a"], "metadata": [{}], "images_png": [_b64((8, 8), "JPEG")]}).encode(),
     "application/json", "not PNG"),
])
def test_malformed_headers_and_pngs_are_400_not_500(server, body, ctype, words):
    r = requests.post(server.url + "/v1/score/rowwise", data=body, headers={"Content-Type": ctype}, timeout=10)
    assert r.status_code == 400 and words in r.json()["error"], (r.status_code, r.text)
    assert server.proc.poll() is None  # and the server lives on


def _png_header_only(width: int, height: int) -> str:
    """A base64 PNG whose header claims width x height but whose pixel data is empty: decoding it
    would fail (a 400), so a 413 for it shows the size was judged from the header alone."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return base64.b64encode(raw).decode()


def _safetensors_claiming(shape) -> bytes:
    """A safetensors body whose header declares `images` of `shape` but holds no data."""
    head = json.dumps({"__metadata__": {"flowpo": json.dumps({"protocol": 1, "prompts": ["a"], "metadata": [{}]})},
                       "images": {"dtype": "U8", "shape": list(shape), "data_offsets": [0, 0]}}).encode()
    return _safetensors_with_header(head)


def _json_pngs(pngs):
    return json.dumps({"prompts": ["a"] * len(pngs), "metadata": [{}] * len(pngs), "images_png": pngs}).encode()


@pytest.mark.parametrize("body, ctype, flag, words", [
    (encode_request(torch.rand(1, 3, 100, 100), ["a"], [{}]), SAFETENSORS, "--max-pixels-per-image", "100x100"),
    (_safetensors_claiming([1, 3, 20000, 20000]), SAFETENSORS, "--max-pixels-per-image", "400,000,000"),
    (_safetensors_claiming([2**40, 3, 8, 8]), SAFETENSORS, "--max-images-per-request", "images in one request"),
    (encode_request(torch.rand(1, 1, 8, 32, 32), ["a"], [{}]), SAFETENSORS, "--max-pixels-per-image", "in 8 frames"),
    (encode_request(torch.rand(60, 1, 28, 28), ["a"] * 60, [{}] * 60), SAFETENSORS, "--max-pixels-per-request",
     "47,040 pixels"),
    (encode_request(torch.rand(65, 1, 1, 1), ["a"] * 65, [{}] * 65), SAFETENSORS, "--max-images-per-request", "65"),
    (_json_pngs([_png_header_only(20000, 20000)]), "application/json", "--max-pixels-per-image", "20000x20000"),
    (_json_pngs([_png_header_only(9000, 9000)] * 8), "application/json", "--max-pixels-per-image", "9000x9000"),
    (_json_pngs([_png_header_only(60, 60)] * 12), "application/json", "--max-pixels-per-request", "43,200"),
    (_json_pngs([_png_header_only(1, 1)] * 65), "application/json", "--max-images-per-request", "65"),
])
def test_pixel_limits_are_413_read_from_the_headers_before_decoding(server, body, ctype, flag, words):
    t0 = time.time()
    r = requests.post(server.url + "/v1/score/rowwise", data=body, headers={"Content-Type": ctype}, timeout=10)
    err = r.json()["error"]
    assert r.status_code == 413 and flag in err and words in err and "\n" not in err, (r.status_code, err)
    assert time.time() - t0 < 5 and server.proc.poll() is None  # nothing was decoded: quick, and the server lives


def test_within_the_pixel_limits_a_request_is_scored(server):
    x = torch.rand(51, 1, 28, 28)  # 39,984 pixels: just under the request limit of 40,000
    r = requests.post(server.url + "/v1/score/rowwise", data=encode_request(x, ["a"] * 51, [{}] * 51),
                      headers={"Content-Type": SAFETENSORS}, timeout=30)
    assert r.status_code == 200 and len(r.json()["scores"]) == 51


def test_every_failure_is_a_json_answer_never_plain_text(server):
    deep = b"[" * 100_000 + b"]" * 100_000
    nested_meta = json.dumps({"protocol": 1, "prompts": ["a"], "metadata": [{}]})[:-1] + ', "x": ' + "[" * 100_000
    cases = [
        ("POST", "/v1/score/rowwise", deep, "application/json", 400, "nests deeper"),
        ("POST", "/v1/score/rowwise", _safetensors_with_header(b'{"a": ' + b"[" * 100_000), SAFETENSORS, 400,
         "nests deeper"),
        ("POST", "/v1/score/rowwise", _safetensors_with_header(json.dumps({"__metadata__": {"flowpo": nested_meta}})
                                                                .encode()), SAFETENSORS, 400, "nests deeper"),
        ("POST", "/v1/score/rowwise", _json_pngs(["bm90IGEgcG5n"]), "application/json", 400, "not PNG"),
        ("GET", "/nowhere", None, None, 404, "no endpoint '/nowhere'"),
        ("GET", "/v1/score/rowwise", None, None, 405, "POST /v1/score"),
    ]
    for method, path, body, ctype, code, words in cases:
        r = requests.request(method, server.url + path, data=body, timeout=10,
                             headers={"Content-Type": ctype} if ctype else {})
        assert r.status_code == code and r.headers["content-type"] == "application/json", (path, r.text[:200])
        assert words in r.json()["error"] and "\n" not in r.json()["error"], r.json()
    assert "Traceback" not in server.log() and requests.get(server.url + "/v1/health", timeout=5).ok


def test_clients_leaving_mid_body_are_logged_in_a_line_not_a_traceback_each(server):
    head = (b"POST /v1/score/rowwise HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000\r\n\r\n")
    before = server.log()
    for _ in range(300):  # each sends a part of its body, then leaves
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(head + b'{"prompts": ["a"], "images_png": ["')
    time.sleep(1.0)
    assert requests.get(server.url + "/v1/health", timeout=5).ok
    new = server.log()[len(before):]
    lines = [ln for ln in new.splitlines() if "left before sending its whole request body" in ln]
    assert "Traceback" not in new and "Exception" not in new, new[-2000:]
    assert 1 <= len(lines) <= 2 and len(new) < 1000, new[-2000:]  # throttled: one line per 10 s, not 300


def test_throttled_log_counts_the_lines_it_left_out():
    from flowpo.rewards.server import ThrottledLog

    out = io.StringIO()
    log = ThrottledLog(every_s=0.2, stream=out)
    written = [log("gone", f"client {i} left") for i in range(50)]
    time.sleep(0.25)
    log("gone", "client 50 left")
    assert written[0] and not any(written[1:])
    assert out.getvalue().splitlines() == ["flowpo serve-reward: client 0 left",
                                           "flowpo serve-reward: client 50 left (and 49 more like it in the last 0s)"]


def test_count_mismatch_and_unknown_reward(server):
    body = encode_request(_images(3), ["a", "b"], [{}, {}])
    r = requests.post(server.url + "/v1/score/rowwise", data=body, headers={"Content-Type": SAFETENSORS}, timeout=10)
    assert r.status_code == 400 and "3 images but 2 prompts" in r.json()["error"]
    r = requests.post(server.url + "/v1/score/nope", data=body, headers={"Content-Type": SAFETENSORS}, timeout=10)
    assert r.status_code == 404 and "served" in r.json()["error"]
    with pytest.raises(ConfigError, match="does not serve 'nope'"):  # bad input: exit code 2
        get_scorer("remote", url=server.url, reward="nope")
    with pytest.raises(ConfigError, match="choose one with"):
        get_scorer("remote", url=server.url)  # several served, none chosen


def test_a_scorer_that_raises_is_a_500_naming_its_error_after_bounded_retries(server):
    rs = RewardSet(["remote@bad"], [1.0], {"remote@bad": {"url": server.url, "reward": "raises", "retries": 1,
                                                          "backoff_s": 0.05}})
    with pytest.raises(RewardError) as e:
        rs.score(_images(2), PROMPTS[:2], META[:2])
    msg = str(e.value)
    assert "remote@bad" in msg and "HTTP 500" in msg and "the detector ran out of memory" in msg
    assert "after 2 attempts" in msg and server.url in msg


def test_a_nan_score_from_the_service_is_refused_by_name(server):
    rs = RewardSet(["remote@nan"], [1.0], {"remote@nan": {"url": server.url, "reward": "nan"}})
    with pytest.raises(RewardError, match=r"'remote@nan' returned NaN/inf for 1 of 4"):
        rs.score(_images(4), PROMPTS[:4], META[:4])


# ---------------------------------------------------------------------- the client's policy, on a scripted server
class Scripted:
    """A real HTTP server on loopback answering POSTs from a script of (status, body, delay)."""

    def __init__(self, script, health=None):
        self.script, self.posts, self.headers, self.bodies = list(script), 0, [], []
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, body):
                raw = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self):
                self._send(200, health or {"status": "ok", "protocol": 1, "rewards": ["r"]})

            def do_POST(self):
                n = int(self.headers.get("Content-Length", 0))
                outer.bodies.append(self.rfile.read(n))
                outer.headers.append(dict(self.headers))
                outer.posts += 1
                code, body, delay = outer.script.pop(0) if len(outer.script) > 1 else outer.script[0]
                time.sleep(delay)
                try:
                    self._send(code, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


OK2 = (200, {"scores": [0.5, 0.25]}, 0)


@pytest.mark.parametrize("script, posts, words", [
    ([(503, {"error": "warming up"}, 0), (502, b"bad gateway", 0), OK2], 3, None),          # retried, then fine
    ([(400, {"error": "images must be RGB"}, 0)], 1, "images must be RGB"),                   # 4xx: not retried
    ([(500, {"error": "CUDA out of memory"}, 0)], 3, "after 3 attempts"),                     # bounded
    ([(200, {"scores": [0.5, 0.25]}, 1.5)], 3, "no reply within timeout_s=0.4s"),             # slower than timeout
    ([(200, b"<html>proxy error</html>", 0)], 1, "malformed reply"),                          # not JSON
    ([(200, {"rewards": [1, 2]}, 0)], 1, "no 'scores'"),                                      # wrong JSON
    ([(200, {"scores": [0.5]}, 0)], 1, "list of 2 numbers"),                                  # wrong count
    ([(429, {"error": "slow down"}, 0), (408, b"", 0), OK2], 3, None),                         # 429/408: retried
    ([(502, b"\n", 0)], 3, "HTTP 502: Bad Gateway"),                                           # blank body
    ([(200, {"scores": [1, 2], "detail": {"scores": [9, 9]}}, 0)], 1, "without a field named"),  # no override
    ([(200, {"scores": [True, False]}, 0)], 1, "list of 2 numbers"),                           # not numbers
])
def test_client_retry_policy(script, posts, words):
    srv = Scripted(script)
    try:
        fn = get_scorer("remote", url=srv.url, timeout_s=0.4, retries=2, backoff_s=0.01)
        if words is None:
            assert fn(_images(2), ["a", "b"], [{}, {}]).tolist() == [0.5, 0.25]
        else:
            with pytest.raises(RewardServiceError, match=words.replace("(", r"\(")) as e:
                fn(_images(2), ["a", "b"], [{}, {}])
            assert srv.url in str(e.value) and "\n" not in str(e.value)
        assert srv.posts == posts
    finally:
        srv.close()


def test_a_413_through_the_client_names_batch_size_and_is_bad_input():
    srv = Scripted([(413, {"error": "request body over the limit of 1 MiB"}, 0)])
    try:
        with pytest.raises(ConfigError, match="batch_size") as e:
            get_scorer("remote", url=srv.url, retries=3)(_images(2), ["a", "b"], [{}, {}])
        assert srv.posts == 1 and "over the limit" in str(e.value)
    finally:
        srv.close()


def test_a_service_of_another_protocol_is_refused_at_start():
    srv = Scripted([OK2], health={"status": "ok", "protocol": 99, "rewards": ["r"]})
    try:
        with pytest.raises(ConfigError, match="protocol 1"):  # a wrong URL: bad input, exit code 2
            get_scorer("remote", url=srv.url)
    finally:
        srv.close()


# ---------------------------------------------------------------------- the client's hard limits, on hostile servers
class RawServer:
    """A TCP server on loopback that answers GET /v1/health as a flowpo service would and hands
    every other request, once its head (and, with read_body, its body) is read, to
    `behave(server, conn, method, path)`: one thread per connection. `sent` counts the bytes
    behaviours sent through send(); `ended` is set when a behaviour stops (e.g. the client cut)."""

    HEALTH = {"status": "ok", "protocol": 1, "rewards": ["r"]}

    def __init__(self, behave, read_body=True):
        self.behave, self.read_body = behave, read_body
        self.sent, self.requests, self.ended = 0, [], threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn):
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                piece = conn.recv(1 << 16)
                if not piece:
                    return
                data += piece
            head, _, body = data.partition(b"\r\n\r\n")
            method, path, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
            length = next((int(ln.split(b":")[1]) for ln in head.split(b"\r\n")[1:]
                           if ln.lower().startswith(b"content-length:")), 0)
            try:
                if method == "GET" and path == "/v1/health":
                    self.send_json(conn, 200, self.HEALTH)
                    return
                while self.read_body and len(body) < length:  # drained: closing then sends no RST
                    body += conn.recv(1 << 16)
                self.requests.append((method, path))
                self.behave(self, conn, method, path)
            except OSError:
                pass
            finally:
                self.ended.set()

    def send(self, conn, data: bytes) -> None:
        conn.sendall(data)
        self.sent += len(data)

    def send_json(self, conn, code, obj, headers=b""):
        raw = json.dumps(obj).encode()
        self.send(conn, f"HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {len(raw)}\r\n"
                        .encode() + headers + b"\r\n" + raw)

    def close(self):
        self.sock.close()


OK_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"


def trickle_chunked(srv, conn, method, path):  # a byte-long chunk every 50 ms: each read is quick, the reply endless
    srv.send(conn, OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n")
    for _ in range(400):
        srv.send(conn, b"1\r\n \r\n")
        time.sleep(0.05)


def trickle_sized(srv, conn, method, path):  # a declared length, delivered a byte every 50 ms
    srv.send(conn, OK_HEAD + b"Content-Length: 100000\r\n\r\n")
    for _ in range(400):
        srv.send(conn, b" ")
        time.sleep(0.05)


def trickle_headers(srv, conn, method, path):  # the status line, then a header line every 50 ms, never the body
    srv.send(conn, b"HTTP/1.1 200 OK\r\n")
    for _ in range(400):
        srv.send(conn, b"X-Slow: 1\r\n")
        time.sleep(0.05)


def _call_remote(url, **options):
    return get_scorer("remote", url=url, **options)(_images(2), ["a", "b"], [{}, {}])


@pytest.mark.parametrize("behave", [trickle_chunked, trickle_sized, trickle_headers])
def test_timeout_s_bounds_an_attempt_whole_against_a_trickling_server(behave):
    srv = RawServer(behave)
    try:
        t0 = time.monotonic()
        with pytest.raises(RewardServiceError, match=r"no reply within timeout_s=0.5s .*after 1 attempts") as e:
            _call_remote(srv.url, timeout_s=0.5, retries=0)
        took = time.monotonic() - t0
        assert 0.45 <= took < 1.5, took  # 64 s before: each trickled read was within the timeout
        assert srv.ended.wait(3)  # the connection was cut, so the server's trickle stopped
        assert "\n" not in str(e.value) and srv.url in str(e.value)
    finally:
        srv.close()


def test_with_retries_a_call_is_bounded_by_attempts_times_timeout_plus_backoff():
    srv = RawServer(trickle_chunked)
    try:
        t0 = time.monotonic()
        with pytest.raises(RewardServiceError, match="after 3 attempts"):
            _call_remote(srv.url, timeout_s=0.5, retries=2, backoff_s=0.1)
        took = time.monotonic() - t0
        bound = 3 * 0.5 + 0.1 * (2 ** 2 - 1)  # (retries + 1) · timeout_s + backoff_s · (2^retries − 1)
        assert bound - 0.2 <= took < bound + 0.8, (took, bound)
        assert srv.requests == [("POST", "/v1/score/r")] * 3
    finally:
        srv.close()


def test_timeout_s_bounds_sending_to_a_server_that_does_not_read():
    from flowpo.rewards.client import Client

    srv = RawServer(lambda srv, conn, method, path: time.sleep(10), read_body=False)
    try:
        client = Client(srv.url, timeout_s=0.5, retries=0, backoff_s=0, what="the reward service")
        t0 = time.monotonic()
        with pytest.raises(RewardServiceError, match="no reply within timeout_s=0.5s"):
            client.call("POST", "/v1/score/r", data=bytes(32 << 20), content_type=SAFETENSORS)  # over the socket buffers
        assert time.monotonic() - t0 < 1.5
    finally:
        srv.close()


def endless(srv, conn, method, path, total=None):
    """A chunked reply of zeros in 1 MiB chunks: endless, or `total` bytes."""
    block = b"100000\r\n" + bytes(1 << 20) + b"\r\n"
    srv.send(conn, OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n")
    for _ in range(total >> 20 if total else 1 << 30):
        srv.send(conn, block)
    srv.send(conn, b"0\r\n\r\n")


GB_1_5 = 3 << 29  # 1.5 GiB


def test_an_endless_reply_is_refused_at_max_reply_mb_while_streaming():
    srv = RawServer(endless)
    try:
        with pytest.raises(RewardServiceError, match=r"passed [\d,]+ bytes while streaming, over max_reply_mb=2 MiB"):
            _call_remote(srv.url, max_reply_mb=2, retries=2)
        assert srv.ended.wait(3) and srv.sent < 32 << 20  # the client stopped reading and hung up
        assert srv.requests == [("POST", "/v1/score/r")]  # not retried: the same server would send it again
    finally:
        srv.close()


def test_a_1_5_gb_reply_is_refused_early_with_bounded_memory():
    import tracemalloc

    srv = RawServer(lambda *a: endless(*a, total=GB_1_5))  # chunked: no length to refuse it by
    try:
        tracemalloc.start()
        try:
            with pytest.raises(RewardServiceError, match=r"over max_reply_mb=64 MiB"):  # the default
                _call_remote(srv.url)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 96 << 20, peak  # the 64 MiB read so far and no more: not 1.5 GB
        assert srv.ended.wait(3) and srv.sent < 256 << 20, srv.sent
    finally:
        srv.close()
    declared = RawServer(lambda srv, conn, m, p: (srv.send(conn, OK_HEAD + f"Content-Length: {GB_1_5}\r\n\r\n".encode()),
                                                  [srv.send(conn, bytes(1 << 20)) for _ in range(GB_1_5 >> 20)]))
    try:
        with pytest.raises(RewardServiceError, match="declares 1,610,612,736 bytes, over max_reply_mb=64 MiB"):
            _call_remote(declared.url)
        assert declared.ended.wait(3) and declared.sent < 64 << 20  # refused from the header: nothing read
    finally:
        declared.close()


def _redirecting(location: str):
    def behave(srv, conn, method, path):
        if path == "/v1/score/r":
            loc = location.replace("{port}", str(srv.port))
            srv.send(conn, f"HTTP/1.1 307 Temporary Redirect\r\nLocation: {loc}\r\nContent-Length: 0\r\n\r\n".encode())
        else:
            srv.send_json(conn, 200, {"scores": [0.5, 0.25]})
    return behave


def test_a_redirect_to_another_port_is_refused_even_when_redirects_are_followed():
    other = Scripted([OK2])
    srv = RawServer(_redirecting(other.url + "/v1/score/r"))
    try:
        for follow in (False, True):
            with pytest.raises(ConfigError, match="another origin .* never followed") as e:
                _call_remote(srv.url, follow_redirects=follow)
            assert other.url in str(e.value) and "\n" not in str(e.value)
        assert other.posts == 0  # nothing was scored there
        assert srv.requests == [("POST", "/v1/score/r")] * 2  # and a refusal is not retried
    finally:
        srv.close()
        other.close()


def test_a_same_origin_redirect_is_followed_only_when_asked():
    srv = RawServer(_redirecting("/v1/score/moved"))
    try:
        with pytest.raises(ConfigError, match="follow_redirects"):
            _call_remote(srv.url)
        assert _call_remote(srv.url, follow_redirects=True).tolist() == [0.5, 0.25]
        assert srv.requests[-2:] == [("POST", "/v1/score/r"), ("POST", "/v1/score/moved")]
    finally:
        srv.close()


@pytest.mark.parametrize("options, words", [
    ({"max_reply_mb": 0}, "max_reply_mb=0.0 must be > 0"), ({"max_reply_mb": float("nan")}, "finite"),
    ({"timeout_s": float("inf")}, "finite"), ({"url": "http://127.0.0.1:99999"}, "port"),
])
def test_bad_client_limits_are_bad_input(options, words):
    with pytest.raises(ConfigError, match=words):
        get_scorer("remote", **{"url": "http://127.0.0.1:1", **options})


# ---------------------------------------------------------------------- training against a service
def _weights(out: Path) -> dict:
    last = sorted((out / "checkpoints").iterdir())[-1]
    return {f"{f.name}/{k}": v for f in sorted(last.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def _remote(url, reward, *extra):
    return ["reward.names=[remote]", f"reward.options.remote.url={url}", f"reward.options.remote.reward={reward}",
            "log.grids=false", *extra]


def test_service_down_at_start_is_one_line_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = cli(capsys, "train", "--out", out, *TINY,
                        *_remote(f"http://127.0.0.1:{free_port()}", "r", "reward.options.remote.retries=1",
                                 "reward.options.remote.backoff_s=0.01"))
    line = one_line(err)
    assert code == 1 and "connection refused" in line and "127.0.0.1" in line and "start the service" in line
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()


def test_overlapped_scoring_is_deterministic_equals_serial_and_logs_detail_fields(tmp_path, server):
    runs = {}
    for name, overlap in (("serial", "false"), ("overlap_a", "true"), ("overlap_b", "true")):
        out = tmp_path / name
        cfg = config.load(None, None, [*TINY, *_remote(server.url, "jittery"), f"reward.overlap={overlap}",
                                       "sample.batch_size=3", "eval.every=0"])
        Trainer(cfg, out).run()
        runs[name] = _weights(out)
    for k in runs["serial"]:
        assert torch.equal(runs["overlap_a"][k], runs["overlap_b"][k]), k   # whatever the thread timing
        assert torch.equal(runs["serial"][k], runs["overlap_a"][k]), k      # a per-image scorer: same rewards
    out = tmp_path / "detail"
    Trainer(config.load(None, None, [*TINY, *_remote(server.url, "rowwise"), "reward.overlap=true"]), out).run()
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if "reward_mean" in r]
    assert all("reward/remote/target" in r and "time/reward_busy_s" in r for r in train)
    assert all(r["reward/remote/target"] == -1.0 for r in train)  # the embedded prompts carry no target


class _Recorder:
    """A RewardSet stand-in: score = 10·row id (read from the image), detail = the row id."""
    names = ["r"]

    def __init__(self, fail_at=None):
        self.calls, self.fail_at = [], fail_at

    def score_detail(self, images, prompts, metadata):
        self.calls.append([m["row"] for m in metadata])
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise RewardError("reward 'r': the detector ran out of memory")
        ids = images.reshape(images.shape[0], -1)[:, 0]
        return (10 * ids)[:, None], {"r/row": torch.tensor([float(m["row"]) for m in metadata])}


def test_chunk_scoring_puts_each_chunk_back_at_its_rows_in_submission_order():
    from flowpo.rewards.overlap import ChunkScoring

    n, rec = 7, _Recorder()
    cs = ChunkScoring(rec, lambda x: x, [f"p{i}" for i in range(n)], [{"row": i} for i in range(n)], n)
    for rows in (torch.tensor([5, 0]), torch.tensor([3, 6, 1]), torch.tensor([2, 4])):
        cs.submit(rows, rows.float().reshape(-1, 1, 1, 1).expand(-1, 1, 2, 2))
    raw, detail, _ = cs.result()
    assert raw[:, 0].tolist() == [10.0 * i for i in range(n)] and detail["r/row"].tolist() == list(range(n))
    assert rec.calls == [[5, 0], [3, 6, 1], [2, 4]]  # one call per chunk, in order, the chunk's rows in order


@pytest.mark.parametrize("fail_fast", [True, False])
def test_chunk_scoring_failure_is_raised_early_or_at_the_end(fail_fast):
    from flowpo.rewards.overlap import ChunkScoring

    rec = _Recorder(fail_at=1)
    cs = ChunkScoring(rec, lambda x: x, ["p"] * 6, [{"row": i} for i in range(6)], 6, fail_fast=fail_fast)
    cs.submit(torch.tensor([0, 1]), torch.zeros(2, 1, 2, 2))
    time.sleep(0.2)  # the first chunk's scoring has failed by now
    if fail_fast:
        with pytest.raises(RewardError, match="out of memory"):
            cs.submit(torch.tensor([2, 3]), torch.zeros(2, 1, 2, 2))
    else:  # lock-stepped ranks: every chunk is sampled (the rollout's collectives), the error comes at result()
        cs.submit(torch.tensor([2, 3]), torch.zeros(2, 1, 2, 2))
        cs.submit(torch.tensor([4, 5]), torch.zeros(2, 1, 2, 2))
        with pytest.raises(RewardError, match="out of memory"):
            cs.result()
    assert rec.calls == [[0, 1]]  # the later chunks are not scored (no second round of retries)


def test_an_overlapped_chunk_that_fails_stops_the_run_in_one_line_with_nothing_written(tmp_path, capsys, server):
    out = tmp_path / "run"
    code, _, err = cli(capsys, "train", "--out", out, *TINY, "eval.every=0", "reward.overlap=true",
                       *_remote(server.url, "raises", "reward.options.remote.retries=0"))
    # the preflight already scores: a scorer that always raises stops the run before anything is written
    assert code == 1 and "the detector ran out of memory" in one_line(err)
    assert not (out / "metrics.jsonl").exists()


def test_service_killed_mid_run_then_resume_continues_to_the_same_weights(tmp_path, capsys):
    port = free_port()
    base = [*TINY, "train.iterations=4", "eval.every=0",
            *_remote(f"http://127.0.0.1:{port}", "d", "reward.options.remote.retries=2",
                     "reward.options.remote.backoff_s=0.05", "reward.options.remote.timeout_s=5")]
    # calls: 1 preflight + 1 first eval + 1 per iteration → dies at the 5th: during iteration 2
    srv = Server("d=service_scorers:dies", port=port, env={"FLOWPO_TEST_DIE_AT": "5"})
    out = tmp_path / "run"
    try:
        code, _, err = cli(capsys, "train", "--out", out, *base)
    finally:
        srv.kill()
    line = one_line(err)
    assert code == 1 and "after 3 attempts" in line and f"127.0.0.1:{port}" in line and "--resume" in line
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "reward_mean" in r]
    assert steps == [0, 1] and sorted(p.name for p in (out / "checkpoints").iterdir())[-1].endswith("2")
    srv = Server("d=service_scorers:dies", port=port)  # back (without the fault)
    try:
        code, _, err = cli(capsys, "train", "--resume", out)
        assert code == 0, err
        ref = tmp_path / "ref"
        code, _, err = cli(capsys, "train", "--out", ref, *base)
        assert code == 0, err
    finally:
        srv.kill()
    a, b = _weights(out), _weights(ref)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------- the VLM judge
class FakeOpenAI(Scripted):
    @staticmethod
    def reply(text):
        return (200, {"choices": [{"message": {"role": "assistant", "content": text}}]}, 0)


def test_vlm_judge_sends_png_template_and_key_and_reads_the_score(monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "sk-test")
    srv = FakeOpenAI([(503, {"error": {"message": "loading"}}, 0), FakeOpenAI.reply("Score: 7.5 / 10")])
    try:
        fn = get_scorer("vlm_judge", url=srv.url + "/v1", model="qwen-vl", api_key_env="JUDGE_KEY",
                        template="Rate {prompt} (digit {target})", concurrency=1, backoff_s=0.01)
        x = _images(2)
        scores, detail = fn.detailed(x, ["a 3", "a 4"], [{"target": 3}, {"target": 4}])
        assert scores.tolist() == pytest.approx([0.75, 0.75]) and detail["unreadable"].tolist() == [0.0, 0.0]
        assert srv.posts == 3                                        # one retry of the 503, then one per image
        req = json.loads(srv.bodies[-1])
        assert req["model"] == "qwen-vl" and srv.headers[-1]["Authorization"] == "Bearer sk-test"
        parts = req["messages"][-1]["content"]
        assert parts[1]["text"] == "Rate a 4 (digit 4)"
        seeds = [json.loads(b)["seed"] for b in srv.bodies[-2:]]
        fn(x[1:], ["a 4"], [{"target": 4}])                          # the same image alone: the same seed
        assert json.loads(srv.bodies[-1])["seed"] == seeds[1] != seeds[0]
        from PIL import Image
        import numpy as np

        png = Image.open(io.BytesIO(base64.b64decode(parts[0]["image_url"]["url"].split(",", 1)[1])))
        assert png.format == "PNG" and np.array_equal(np.asarray(png), to_uint8(x[1, 0]).numpy())  # lossless
    finally:
        srv.close()


def test_vlm_judge_unreadable_replies_error_or_a_counted_value(tmp_path):
    srv = FakeOpenAI([FakeOpenAI.reply("I cannot rate this image.")])
    try:
        with pytest.raises(RewardError, match="has no score matching pattern"):
            get_scorer("vlm_judge", url=srv.url, model="m")(_images(1), ["a 1"], [{}])
        rs = RewardSet(["vlm_judge"], [1.0], {"vlm_judge": {"url": srv.url, "model": "m", "on_unreadable": "value",
                                                            "unreadable_value": -1.0}})
        raw, detail = rs.score_detail(_images(3), ["a"] * 3, [{}] * 3)
        assert raw[:, 0].tolist() == [-1.0] * 3 and detail["vlm_judge/unreadable"].tolist() == [1.0] * 3
        rs = RewardSet(["vlm_judge"], [1.0], {"vlm_judge": {"url": srv.url, "model": "m", "pattern": r"(\d+)|cannot",
                                                            "on_unreadable": "value"}})
        assert rs.score_detail(_images(1), ["a"], [{}])[1]["vlm_judge/unreadable"].tolist() == [1.0]  # group 1 unset
        with pytest.raises(ConfigError, match="needs field 'target'"):
            get_scorer("vlm_judge", url=srv.url, model="m", template="{prompt} {target}")(_images(1), ["a"], [{}])
        with pytest.raises(ConfigError, match="no \\{prompt\\} field"):
            get_scorer("vlm_judge", url=srv.url, model="m", template="rate it")
    finally:
        srv.close()


# ---------------------------------------------------------------------- the command line and torchrun
def test_serve_reward_bad_arguments_areone_line(capsys):
    code, _, err = cli(capsys, "serve-reward", "--reward", "stroke_quality", "--option", "nope.device=cpu")
    assert code == 2 and "'nope' is not served" in one_line(err)
    code, _, err = cli(capsys, "serve-reward", "--reward", "stroke_qualty")
    assert code == 2 and "did you mean 'stroke_quality'" in one_line(err)
    with socket.socket() as taken:  # a port another process holds: said before any model loads
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code, _, err = cli(capsys, "serve-reward", "--reward", "stroke_quality", "--port", taken.getsockname()[1])
    assert code == 2 and "cannot listen on 127.0.0.1" in one_line(err)


@pytest.mark.slow
@pytest.mark.ci  # the ranks agree on a reward failure instead of waiting out the stall timeout: ~6 s each
@pytest.mark.parametrize("mode", [[], ["model.mode=full", "reward.overlap=true", "sample.batch_size=2"]],
                         ids=["lora", "sharded_full_overlapped"])
def test_a_reward_failing_on_one_rank_stops_every_rank_promptly(tmp_path, mode):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", FLOWPO_DIST_TIMEOUT_S="300",
               PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "flowpo",
           "train", "--out", str(tmp_path / "run"), *TINY, "eval.every=0", "log.grids=false",
           "reward.names=[service_scorers:fails_on_rank_1]", *mode]
    t0 = time.time()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    took = time.time() - t0
    text = r.stdout + r.stderr
    assert r.returncode != 0 and took < 120, (took, text[-2000:])  # far below the 300 s stall timeout
    assert "rank 1's scorer is broken" in text and "a reward failed on another rank" in text, text[-2000:]


@pytest.mark.parametrize("flag, value", [
    ("--max-request-mb", "nan"), ("--max-request-mb", "inf"), ("--max-request-mb", "-1"), ("--max-request-mb", "0"),
    ("--max-request-mb", "1e300"), ("--max-pixels-per-image", "0"), ("--max-pixels-per-request", "-5"),
    ("--max-images-per-request", "0"),
])
def test_serve_reward_bad_limits_are_exit_2_naming_the_option(capsys, flag, value):
    code, _, err = cli(capsys, "serve-reward", "--reward", "stroke_quality", flag, value)
    line = one_line(err)
    assert code == 2 and f"{flag}=" in line and ("must be" in line or "beyond" in line), line


def test_serve_reward_limit_that_is_not_a_whole_number_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli(capsys, "serve-reward", "--reward", "stroke_quality", "--max-pixels-per-image", "1.5")
    assert e.value.code == 2 and "--max-pixels-per-image: invalid int value: '1.5'" in capsys.readouterr().err


def test_serve_reward_defaults_are_the_documented_limits():
    from flowpo.cli import build_parser
    from flowpo.rewards.service import Limits

    a = build_parser().parse_args(["serve-reward", "--reward", "x"])
    assert Limits(a.max_pixels_per_image, a.max_pixels_per_request, a.max_images_per_request) == Limits()
    doc = (TESTS.parent / "docs" / "reward_services.md").read_text()
    for flag, value in (("--max-request-mb", "256"), ("--max-pixels-per-image", "16777216"),
                        ("--max-pixels-per-request", "67108864"), ("--max-images-per-request", "4096")):
        assert f"`{flag}` (default {value}" in doc, flag


def test_serve_reward_advice_is_in_serve_reward_syntax(capsys):
    code, _, err = cli(capsys, "serve-reward", "--reward", "pickscore")
    line = one_line(err)
    assert code == 2 and "--option pickscore.path=/path/to/" in line and "reward.options" not in line
    code, _, err = cli(capsys, "serve-reward", "--reward", "ps=pickscore", "--option", "ps.path=/nonexistent")
    line = one_line(err)
    assert code == 2 and "--option ps.path='/nonexistent' does not exist" in line and "reward.options" not in line
    code, _, err = cli(capsys, "serve-reward", "--reward", "judge=remote")  # advice written for any <name>
    line = one_line(err)
    assert code == 2 and "--option judge.url=http://HOST:PORT" in line and "reward.options" not in line
