"""The upstream transport (qubax.providers.transport): the one session every adapter sends through, how
it finds proxies and CAs, bounds its connections and waits, and how transport failures become our errors.

Upstreams here are real servers on loopback: a fake provider served by uvicorn, or a few lines of raw
asyncio when a test needs to decide exactly what goes on the wire (and when it does not).
"""

import asyncio
import contextlib
import gzip
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

from qubax.errors import UpstreamError, UpstreamTimeout
from qubax.limits.slots import LocalSlots
from qubax.providers import Upstream, replies
from qubax.providers.together import Together
from qubax.providers.transport import Timeouts, open_session, send
from tests.fakes.together import FakeTogether
from tests.providers import Job, ask
from tests.proxy import forwarding_proxy
from tests.server import serve

JOB = Job(model="black-forest-labs/FLUX.1-schnell", prompt="a red fox in snow", width=256, height=256, n=1)
GENERATIONS = "/v1/images/generations"

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


# --- raw upstreams -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    body: bytes


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    """The next request on a connection (bodies by Content-Length only), or None once the client closed it."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, path, _version = lines[0].split(" ", 2)
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    return Request(method, path, await reader.readexactly(length))


def answer(body: bytes = b'{"ok": true}', *, close: bool = False) -> bytes:
    connection = "close" if close else "keep-alive"
    head = f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
    return f"{head}connection: {connection}\r\n\r\n".encode() + body


@contextlib.asynccontextmanager
async def listening(handle: Handler) -> AsyncIterator[str]:
    """Serve `handle` per connection on 127.0.0.1 in the running loop; yield the base URL. On exit, every
    connection still open is closed and its handler cancelled."""
    tasks: set[asyncio.Task[None]] = set()

    async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handle(reader, writer)
        except asyncio.CancelledError:
            pass  # by us, below; Python 3.11's asyncio would log a handler that ends cancelled as an error
        finally:
            writer.close()
            tasks.discard(task)

    server = await asyncio.start_server(tracked, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


class Silent:
    """Takes each request, then never says a word."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.arrived = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await read_request(reader)
        if request is not None:
            self.requests.append(request)
            self.arrived.set()
        await reader.read()  # nothing more comes; wait until the client gives up and closes


class KeptAlive:
    """Answers the first request on each connection, keeping the connection open. Then either it closes the
    connection at once (`fin_after_answer`, a server that closes idle connections early), or it reads the
    next request on it and closes the connection without answering (one that dropped it as that arrived)."""

    def __init__(self, *, fin_after_answer: bool = False) -> None:
        self.fin_after_answer = fin_after_answer
        self.connections = 0
        self.requests: list[tuple[int, str]] = []  # (connection number, method)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        request = await read_request(reader)
        if request is None:
            return
        self.requests.append((number, request.method))
        writer.write(answer())
        await writer.drain()
        if self.fin_after_answer:
            return
        if (later := await read_request(reader)) is not None:
            self.requests.append((number, later.method))


# --- fakes over TLS ------------------------------------------------------------------------------------


@contextlib.contextmanager
def serve_tls(app: Any, certfile: Path, keyfile: Path) -> Iterator[int]:
    """`tests.server.serve`, over TLS: yield the port while the app serves HTTPS on 127.0.0.1."""
    with serve(app, ssl_certfile=str(certfile), ssl_keyfile=str(keyfile)) as url:
        yield int(url.rsplit(":", 1)[1])


@dataclass(frozen=True)
class Tls:
    ca_file: Path  # what SSL_CERT_FILE points at
    port: int


@pytest.fixture
def fake() -> FakeTogether:
    return FakeTogether()


@pytest.fixture
def fake_port(fake: FakeTogether) -> Iterator[int]:
    with serve(fake.app) as url:
        yield int(url.rsplit(":", 1)[1])


@pytest.fixture
def fake_tls(fake: FakeTogether, tmp_path: Path) -> Iterator[Tls]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca_file, certfile, keyfile = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert.private_key_pem.write_to_path(str(keyfile))
    for number, blob in enumerate(cert.cert_chain_pems):
        blob.write_to_path(str(certfile), append=number > 0)
    with serve_tls(fake.app, certfile, keyfile) as port:
        yield Tls(ca_file, port)


def held(upstream: Upstream) -> int:
    """Slots the upstream's key pool holds now."""
    slots = upstream.pool.slots
    assert isinstance(slots, LocalSlots)
    return sum(len(holders) for holders in slots.held.values())


# --- proxies -------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_http_proxy_and_no_proxy_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, fake: FakeTogether, fake_port: int
) -> None:
    async with asyncio.timeout(10), forwarding_proxy() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        async with open_session() as session:
            for host in ("127.0.0.1", "localhost"):
                [image] = await ask(Together(Upstream(session, f"http://{host}:{fake_port}/v1", "test-key")), JOB)
                assert image.data.startswith(b"\x89PNG")
        assert proxy.seen == [
            f"POST http://127.0.0.1:{fake_port}{GENERATIONS}",
            f"POST http://localhost:{fake_port}{GENERATIONS}",
        ]

        monkeypatch.setenv("NO_PROXY", "example.com,localhost")
        async with open_session() as session:
            [image] = await ask(Together(Upstream(session, f"http://localhost:{fake_port}/v1", "test-key")), JOB)

        assert image.data.startswith(b"\x89PNG")
        assert len(proxy.seen) == 2  # the last call went straight to the fake
        assert len(fake.requests) == 3


@pytest.mark.anyio
async def test_https_goes_through_a_connect_tunnel_and_trusts_ssl_cert_file(
    monkeypatch: pytest.MonkeyPatch, fake: FakeTogether, fake_tls: Tls
) -> None:
    async with asyncio.timeout(10), forwarding_proxy() as proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        monkeypatch.setenv("SSL_CERT_FILE", str(fake_tls.ca_file))
        async with open_session() as session:
            together = Together(Upstream(session, f"https://127.0.0.1:{fake_tls.port}/v1", "test-key"))
            [image] = await ask(together, JOB)

    assert image.data.startswith(b"\x89PNG")
    assert proxy.seen == [f"CONNECT 127.0.0.1:{fake_tls.port}"]
    assert len(fake.requests) == 1


@pytest.mark.anyio
async def test_https_without_our_ca_is_refused_before_anything_is_sent(fake: FakeTogether, fake_tls: Tls) -> None:
    # The counterpart of the test above: SSL_CERT_FILE is what made the fake's certificate trusted.
    async with asyncio.timeout(10), open_session() as session:
        together = Together(Upstream(session, f"https://127.0.0.1:{fake_tls.port}/v1", "test-key"))
        with pytest.raises(UpstreamError) as caught:
            await ask(together, JOB)

    assert caught.value.message == "Could not reach Together."
    assert caught.value.detail.startswith("Could not reach Together: SSLCertVerificationError")
    assert (caught.value.retryable, caught.value.failover) == (True, True)
    assert fake.requests == []


class Recorder:
    """Answers every request at once and keeps the Authorization header each one carried."""

    def __init__(self) -> None:
        self.authorizations: list[str | None] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (head := await read_head(reader)) is not None:
            found = [line.split(":", 1)[1].strip() for line in head if line.lower().startswith("authorization:")]
            self.authorizations.append(found[0] if found else None)
            writer.write(answer())
            await writer.drain()


async def read_head(reader: asyncio.StreamReader) -> list[str] | None:
    try:
        return (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


@pytest.mark.anyio
async def test_a_netrc_file_changes_nothing_we_send(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    netrc = tmp_path / "netrc"
    netrc.write_text("default login someone password secret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    server = Recorder()
    async with asyncio.timeout(10), listening(server.handle) as url, open_session() as session:
        await send(session, "x", "GET", f"{url}/file")  # a result download: no key of ours
        await send(session, "x", "POST", f"{url}/generate", headers={"authorization": "Bearer provider-key"})

    assert server.authorizations == [None, "Bearer provider-key"]


# --- timeouts and failures to connect ------------------------------------------------------------------


@pytest.mark.anyio
async def test_silent_upstream_times_out_and_gives_its_slot_back() -> None:
    silent = Silent()
    async with (
        asyncio.timeout(10),
        listening(silent.handle) as url,
        open_session(Timeouts(connect=5, read=0.3)) as session,
    ):
        upstream = Upstream(session, f"{url}/v1", "test-key", concurrency=1)
        together = Together(upstream)
        for attempt in (1, 2):  # the second would wait for the slot forever if the first kept it
            started = time.monotonic()
            call = asyncio.create_task(ask(together, JOB))
            await silent.arrived.wait()
            silent.arrived.clear()
            assert held(upstream) == 1  # the call holds the key's only slot while it waits

            with pytest.raises(UpstreamError) as caught:
                await call

            assert time.monotonic() - started < 2
            assert caught.value.message == "Together sent nothing for 0.3 seconds."
            assert (caught.value.retryable, caught.value.failover) == (True, False)
            assert isinstance(caught.value.__cause__, aiohttp.SocketTimeoutError)
            assert held(upstream) == 0
            assert len(silent.requests) == attempt
            assert silent.requests[-1].path == GENERATIONS


async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers each request one byte of body every 0.1 s, never silent for long, never done."""
    if await read_request(reader) is None:
        return
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n")
    with contextlib.suppress(ConnectionError):  # until the client gives up
        while True:
            writer.write(b" ")
            await writer.drain()
            await asyncio.sleep(0.1)


@pytest.mark.anyio
async def test_a_submission_must_be_answered_within_its_own_timeout_all_told() -> None:
    async with (
        asyncio.timeout(10),
        listening(trickle) as url,
        open_session(Timeouts(connect=5, read=5, submit=0.5)) as session,
    ):
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout) as caught:
            await send(session, "x", "POST", f"{url}/v1/flux", json={"prompt": "a fox"}, submission=True)
        took = time.monotonic() - started
        # Anything else only has to keep talking: the same trickle is still being read past the limit.
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(1):
                await send(session, "x", "GET", f"{url}/v1/get_result")

    assert took < 1  # well under the 5 s read timeout the trickle never trips
    assert caught.value.message == "x did not accept the work within 0.5 seconds."
    # Nothing was accepted, so another route may take the work; the breaker counts it as a failure.
    assert (caught.value.retryable, caught.value.failover, caught.value.code) == (True, True, "upstream_timeout")


@pytest.mark.anyio
async def test_nothing_listening_is_retryable_and_may_fail_over() -> None:
    async with asyncio.timeout(10), open_session(Timeouts(connect=5, read=5)) as session:
        upstream = Upstream(session, "http://127.0.0.1:9/v1", "test-key", concurrency=1)
        with pytest.raises(UpstreamError) as caught:
            await ask(Together(upstream), JOB)

    assert caught.value.message == "Could not reach Together."  # the client is not told where we connect
    assert caught.value.detail == "Could not reach Together: ConnectionRefusedError (127.0.0.1:9)."
    assert (caught.value.retryable, caught.value.failover) == (True, True)
    assert held(upstream) == 0


# --- kept-alive connections ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_get_on_a_dropped_kept_alive_connection_is_sent_again_on_a_new_one() -> None:
    server = KeptAlive()
    async with asyncio.timeout(10), listening(server.handle) as url, open_session() as session:
        first = await send(session, "x", "GET", f"{url}/a")
        second = await send(session, "x", "GET", f"{url}/b")

    assert (first.status_code, second.status_code) == (200, 200)
    assert second.json() == {"ok": True}
    # The second GET went out on the kept-alive connection, which the server dropped, then on a new one.
    assert server.requests == [(1, "GET"), (1, "GET"), (2, "GET")]
    assert server.connections == 2


@pytest.mark.anyio
async def test_post_on_a_dropped_kept_alive_connection_is_not_sent_again() -> None:
    server = KeptAlive()
    async with asyncio.timeout(10), listening(server.handle) as url, open_session() as session:
        await send(session, "x", "GET", f"{url}/a")
        with pytest.raises(UpstreamError) as caught:
            await send(session, "x", "POST", f"{url}/b", json={"prompt": "a fox"})

    # It may have arrived (it did), so it may be billed: neither resent nor re-routed, but the client may retry.
    assert caught.value.message == "x connection failed."
    assert caught.value.detail == "x connection failed: Server disconnected."
    assert (caught.value.retryable, caught.value.failover) == (True, False)
    assert server.requests == [(1, "GET"), (1, "POST")]
    assert server.connections == 1


@pytest.mark.anyio
async def test_idle_connection_the_server_closed_is_not_reused() -> None:
    server = KeptAlive(fin_after_answer=True)
    async with asyncio.timeout(10), listening(server.handle) as url, open_session() as session:
        await send(session, "x", "GET", f"{url}/a")
        await asyncio.sleep(0.2)  # idle: the server's FIN arrives
        # A POST, which is never resent: it succeeds only if it went out on a new connection at once.
        reply = await send(session, "x", "POST", f"{url}/b", json={"prompt": "a fox"})

    assert reply.status_code == 200
    assert server.requests == [(1, "GET"), (2, "POST")]


# --- limits --------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_connections_are_capped() -> None:
    in_flight, peak, connections = 0, 0, 0

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal in_flight, peak, connections
        connections += 1
        while await read_request(reader) is not None:
            in_flight += 1
            peak = max(peak, in_flight)
            await asyncio.sleep(0.3)
            in_flight -= 1
            writer.write(answer())
            await writer.drain()

    async with asyncio.timeout(10), listening(slow) as url, open_session(connections=2) as session:
        replies = await asyncio.gather(*(send(session, "x", "GET", f"{url}/{i}") for i in range(5)))

    assert [reply.status_code for reply in replies] == [200] * 5
    assert peak == 2
    assert connections == 2


def too_large_answer(kind: str, size: int) -> bytes:
    body = b"x" * size
    if kind == "content-length":
        return f"HTTP/1.1 200 OK\r\ncontent-length: {size}\r\n\r\n".encode() + body
    if kind == "gzip":  # small on the wire, large once decompressed
        packed = gzip.compress(body)
        return f"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-length: {len(packed)}\r\n\r\n".encode() + packed
    chunks = [body[i : i + 300] for i in range(0, size, 300)]
    framed = b"".join(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" for chunk in chunks)
    return b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + framed + b"0\r\n\r\n"


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["content-length", "chunked", "gzip"])
async def test_answer_larger_than_the_cap_is_refused(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    monkeypatch.setattr(replies, "MAX_BODY_BYTES", 1000)

    async def sized(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (request := await read_request(reader)) is not None:
            writer.write(too_large_answer(kind, int(request.path.strip("/"))))
            await writer.drain()

    async with asyncio.timeout(10), listening(sized) as url, open_session() as session:
        at_the_cap = await send(session, "x", "GET", f"{url}/1000")
        with pytest.raises(UpstreamError) as caught:
            await send(session, "x", "GET", f"{url}/1001")

    assert at_the_cap.content == b"x" * 1000
    assert caught.value.message == "x sent a response larger than we accept."
    assert (caught.value.retryable, caught.value.failover) == (False, False)
