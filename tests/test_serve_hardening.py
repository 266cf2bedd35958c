"""Server hardening (issue #20, defect 5), over real sockets on 127.0.0.1.

The app runs under the real uvicorn server with slimtune's protocol (:mod:`slimtune.serve.server`)
in a background thread; raw sockets play the abusive clients: an API key checked before the
body is read, sizes refused from the header and while reading, slow headers and slow bodies
timed out, a connection cap that evicts idle connections, and a SIGTERM that exits within the
drain time while a client trickles a body (a real ``slimtune serve`` process).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from tiny import SPECIALS, make_tiny_bert

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from slimtune.serve.app import ServeConfig, create_app, load_runner  # noqa: E402
from slimtune.serve.server import server_config  # noqa: E402

WORDS = "good great bad awful movie film the a is".split()
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("bert"), vocab=[*SPECIALS, *WORDS, ".", ","],
                          id2label={0: "negative", 1: "positive"})


@pytest.fixture(scope="module")
def runner(bert_dir: Path):  # noqa: ANN201
    return load_runner(str(bert_dir))


@contextmanager
def serving(runner, **kw) -> Iterator[int]:  # noqa: ANN001
    """Run the app under uvicorn + slimtune's protocol in a thread; yield its port."""
    cfg = ServeConfig(max_wait_ms=1, log_level="warning", **kw)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(server_config(create_app(runner, cfg), cfg))
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        t.join(30)
        sock.close()


def _connect(port: int, timeout: float = 5.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return s


def _headers(length: int | None = None, key: str | None = None, ctype: str = "application/json",
             extra: str = "") -> bytes:
    h = f"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\n"
    if length is not None:
        h += f"Content-Length: {length}\r\n"
    if key:
        h += f"Authorization: Bearer {key}\r\n"
    return (h + extra + "\r\n").encode()


def _read_response(s: socket.socket) -> tuple[int, bytes, bool]:
    """(status, raw response, whether the server then closed the connection)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    if not data:
        return 0, b"", True
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next((int(x.split(b":")[1]) for x in head.split(b"\r\n") if x.lower().startswith(b"content-length")), 0)
    while len(rest) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        rest += chunk
    try:
        closed = s.recv(1) == b""
    except TimeoutError:
        closed = False
    return int(head.split(b" ")[1]), head + b"\r\n\r\n" + rest, closed


def _ok_request(port: int, key: str | None = None) -> int:
    body = b'{"texts": ["a good film"]}'
    with _connect(port) as s:
        s.sendall(_headers(len(body), key) + body)
        return _read_response(s)[0]


def test_api_key_is_checked_before_the_body_is_read(runner) -> None:
    with serving(runner, api_key="s3cret") as port, _connect(port, timeout=5) as s:
        s.sendall(_headers(900_000))  # declares ~1 MB, sends none of it, no key
        status, raw, closed = _read_response(s)
        assert status == 401 and b"www-authenticate: bearer" in raw.lower()
        assert closed  # the unread body is never buffered: the connection is closed
        assert _ok_request(port, "s3cret") == 200


def test_declared_oversized_body_is_413_before_reading(runner) -> None:
    with serving(runner, max_body_bytes=10_000) as port, _connect(port) as s:
        s.sendall(_headers(2_000_000))
        status, _, closed = _read_response(s)
        assert status == 413 and closed


def test_body_cap_is_enforced_while_reading(runner) -> None:
    with serving(runner, max_body_bytes=10_000) as port, _connect(port) as s:
        s.sendall(_headers(extra="Transfer-Encoding: chunked\r\n"))
        for _ in range(3):  # 15 KB of an endless chunked body
            s.sendall(b"1388\r\n" + b"x" * 5000 + b"\r\n")
        status, _, closed = _read_response(s)
        assert status == 413 and closed


def test_wrong_content_type_is_415(runner) -> None:
    with serving(runner) as port, _connect(port) as s:
        s.sendall(_headers(10, ctype="text/plain") + b"texts=good")
        assert _read_response(s)[0] == 415


def test_slow_headers_are_closed_after_the_header_timeout(runner) -> None:
    with serving(runner, header_timeout_s=0.5) as port, _connect(port, timeout=10) as s:
        t0 = time.monotonic()
        s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finished
        assert s.recv(1) == b""  # closed by the server
        assert time.monotonic() - t0 < 3


def test_slow_body_gets_408_after_the_body_timeout(runner) -> None:
    with serving(runner, body_timeout_s=0.5) as port, _connect(port, timeout=10) as s:
        t0 = time.monotonic()
        s.sendall(_headers(100) + b'{"texts": ')
        status, _, closed = _read_response(s)
        assert status == 408 and closed and time.monotonic() - t0 < 3


def test_connection_cap_evicts_idle_connections_and_serves_new_clients(runner) -> None:
    with serving(runner, max_connections=20, header_timeout_s=60) as port:
        idle = [_connect(port, timeout=0.2) for _ in range(60)]
        time.sleep(0.5)
        assert _ok_request(port) == 200  # a real client still gets in
        open_ = 0
        for s in idle:
            try:
                open_ += s.recv(1) != b""
            except TimeoutError:
                open_ += 1  # still open (nothing to read)
            except ConnectionResetError:
                pass
            s.close()
        assert open_ <= 20, f"{open_} idle connections still open with --max-connections 20"


def test_sigterm_exits_within_the_drain_time_while_a_body_trickles(bert_dir: Path) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, "-m", "slimtune.cli.main", "serve", "--model", str(bert_dir), "--port",
                             str(port), "--drain-s", "2", "--body-timeout-s", "120", "--log-level", "warning"],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.2)
        s.sendall(_headers(1000) + b'{"texts": ["')  # then trickle
        s.sendall(b"a")
        time.sleep(0.3)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        while proc.poll() is None and time.monotonic() - t0 < 20:
            try:
                s.sendall(b"a")
            except OSError:
                pass
            time.sleep(0.1)
        took = time.monotonic() - t0
        assert proc.poll() is not None, "still running 20 s after SIGTERM"
        assert took < 2 + 3, f"exited {took:.1f} s after SIGTERM (drain 2 s)"
        s.close()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
