"""Connection limits of `qubax serve`, checked over raw sockets against a running server process."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_readme import free_port, wait_for_health

HEADER_TIMEOUT = BODY_TIMEOUT = 1.5
MAX_CONNECTIONS = 12
LIMITS = {
    "QUBAX_MAX_HEADER_BYTES": "4096",
    "QUBAX_MAX_URL_BYTES": "1024",
    "QUBAX_HEADER_TIMEOUT_SECONDS": str(HEADER_TIMEOUT),
    "QUBAX_BODY_TIMEOUT_SECONDS": str(BODY_TIMEOUT),
    "QUBAX_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
}
HEALTH = b"GET /healthz HTTP/1.1\r\nhost: qubax\r\n\r\n"


@contextlib.contextmanager
def served(data: Path, **variables: str) -> Iterator[int]:
    """`qubax serve` in its own process with these variables; yields its port."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUBAX_")}
    env |= {"QUBAX_DATA_DIR": str(data / "data"), **variables}
    port = free_port()
    qubax = str(Path(sys.executable).parent / "qubax")
    with (data / "serve.log").open("wb") as log:
        server = subprocess.Popen(
            [qubax, "serve", "--port", str(port)], env=env, stdout=log, stderr=log, start_new_session=True
        )
        try:
            wait_for_health(f"http://127.0.0.1:{port}", server, 30)
            yield port
        finally:
            stop(server, data / "serve.log")


def stop(server: "subprocess.Popen[bytes]", log: Path) -> None:
    """SIGTERM, as an operator's supervisor sends it; a server still running 30 s later is killed and
    the test fails with the end of its log, which says what it was waiting for."""
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        pytest.fail(f"`qubax serve` did not stop within 30 s of SIGTERM; its log ends:\n{tail}")


@pytest.fixture(scope="module")
def port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    with served(tmp_path_factory.mktemp("serve"), QUBAX_ACCESS_LOG="false", **LIMITS) as port:
        yield port


@contextlib.contextmanager
def connected(port: int) -> Iterator[socket.socket]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        yield sock


def answer(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (or 10 s pass)."""
    chunks = []
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def read_response(sock: socket.socket) -> bytes:
    """One whole response (its head and its `content-length` body), leaving the connection open."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def error_code(response: bytes) -> str:
    """The OpenAI error body's code, which even the server's own refusals carry."""
    return str(json.loads(response.partition(b"\r\n\r\n")[2])["error"]["code"])


def closed_within(sock: socket.socket, seconds: float) -> float:
    """Seconds until the server closed the connection, reading (and ignoring) what it said first."""
    started = time.monotonic()
    sock.settimeout(seconds)
    answer(sock)
    return time.monotonic() - started


def test_a_head_over_the_limit_is_431_and_the_connection_closed(port: int) -> None:
    with connected(port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: qubax\r\n" + b"x-filler: " + b"a" * 5000 + b"\r\n\r\n")
        response = answer(sock)  # returns only because the server closed the connection

    assert (status(response), error_code(response)) == (431, "headers_too_large")


def test_a_huge_head_is_refused_without_being_read(port: int) -> None:
    sent = 0
    with connected(port) as sock, contextlib.suppress(ConnectionError):
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: qubax\r\nx-filler: ")
        for _ in range(1600):  # 100 MB, were it all taken
            sock.sendall(b"a" * 65536)
            sent += 65536

    assert sent < 10_000_000


def test_a_url_over_the_limit_is_414(port: int) -> None:
    with connected(port) as sock:
        sock.sendall(b"GET /healthz?" + b"a" * 2000 + b" HTTP/1.1\r\nhost: qubax\r\n\r\n")
        response = answer(sock)

    assert (status(response), error_code(response)) == (414, "url_too_long")


def test_a_head_sent_a_byte_at_a_time_is_cut_off_at_the_header_timeout(port: int) -> None:
    started = time.monotonic()
    received = b""
    with connected(port) as sock, contextlib.suppress(ConnectionError):
        for byte in HEALTH[:-2] + b"x" * 1000:  # a head that never ends
            sock.sendall(bytes([byte]))
            time.sleep(0.05)
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                received = sock.recv(1024)
                break
            sock.setblocking(True)

    assert status(received) == 408
    assert HEADER_TIMEOUT <= time.monotonic() - started < HEADER_TIMEOUT + 3


def test_a_connection_that_says_nothing_is_closed_at_the_header_timeout(port: int) -> None:
    with connected(port) as sock:
        took = closed_within(sock, HEADER_TIMEOUT + 5)

    assert HEADER_TIMEOUT - 0.1 <= took < HEADER_TIMEOUT + 3


def test_a_body_sent_too_slowly_is_cut_off_at_the_body_timeout(port: int) -> None:
    head = b"POST /v1/images/generations HTTP/1.1\r\nhost: qubax\r\ncontent-type: application/json\r\n"
    with connected(port) as sock:
        sock.sendall(head + b"authorization: Bearer qbx_test_x\r\ncontent-length: 1000\r\n\r\n{")
        started = time.monotonic()
        response = answer(sock)

    assert status(response) == 408
    assert BODY_TIMEOUT - 0.1 <= time.monotonic() - started < BODY_TIMEOUT + 3


def test_a_refused_chunked_body_closes_the_connection(port: int) -> None:
    head = b"POST /v1/images/generations HTTP/1.1\r\nhost: qubax\r\ntransfer-encoding: chunked\r\n\r\n"
    sent = 0
    with connected(port) as sock:
        sock.sendall(head)  # no key, and soon over the 1 MiB body limit
        with contextlib.suppress(ConnectionError):
            for _ in range(16_000):  # 1 GB, were it all taken
                sock.sendall(b"10000\r\n" + b"a" * 65536 + b"\r\n")
                sent += 65536
        response = answer(sock)

    assert status(response) == 413
    assert sent < 50_000_000  # what the socket buffers held before the server closed


def test_connections_beyond_the_limit_are_refused_and_the_server_keeps_answering(port: int) -> None:
    with contextlib.ExitStack() as stack:
        held = [stack.enter_context(connected(port)) for _ in range(MAX_CONNECTIONS)]
        time.sleep(0.2)
        extra = [stack.enter_context(connected(port)) for _ in range(5)]
        # Each connection over the limit is closed at once, long before the header timeout.
        assert all(closed_within(sock, HEADER_TIMEOUT) < HEADER_TIMEOUT / 2 for sock in extra)
        held[0].sendall(HEALTH)
        assert held[0].recv(65536).startswith(b"HTTP/1.1 200 ")


def test_a_kept_alive_connection_serves_one_request_after_another(port: int) -> None:
    body = b'{"model": "flux-1.1-pro"}'
    post = b"POST /v1/images/generations HTTP/1.1\r\nhost: qubax\r\ncontent-type: application/json\r\n"
    with connected(port) as sock:
        for _ in range(3):
            sock.sendall(HEALTH)
            assert status(read_response(sock)) == 200
            time.sleep(HEADER_TIMEOUT * 0.7)  # together longer than one header timeout: each request has its own
        # A body read to its end (the 401 comes after it was read): the connection stays open.
        sock.sendall(post + b"content-length: %d\r\n\r\n" % len(body) + body)
        assert status(read_response(sock)) == 401
        sock.sendall(HEALTH)
        assert status(read_response(sock)) == 200
