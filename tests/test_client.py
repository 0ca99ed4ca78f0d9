"""The upstream HTTP client against servers that answer exactly the bytes each test writes, on the plain
asyncio loop and on uvloop (what `qubax serve` runs)."""

import asyncio
import gzip
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trustme

from qubax.client import Client, ConnectError, ExchangeError, TooLarge

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
HANG_UP = b"<then the server closes the connection>"


@pytest.fixture(params=[pytest.param(False, id="asyncio"), pytest.param(True, id="uvloop")])
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return ("asyncio", {"use_uvloop": request.param})


class Server:
    def __init__(self, answers: list[bytes] | None = None) -> None:
        self.answers = list(answers or [OK])  # written in turn, one per request; the last one repeats
        self.requests: list[bytes] = []  # each request's head and body, as received
        self.connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                lines = head.split(b"\r\n")
                length = next((int(line[15:]) for line in lines if line.startswith(b"content-length:")), 0)
                self.requests.append(head + await reader.readexactly(length))
                answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
                writer.write(answer.removesuffix(HANG_UP))
                await writer.drain()
                if answer.endswith(HANG_UP):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()


@asynccontextmanager
async def serving(server: Server, tls: ssl.SSLContext | None = None) -> AsyncIterator[str]:
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0, ssl=tls)
    port = listener.sockets[0].getsockname()[1]
    async with listener:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}"


@pytest.mark.anyio
async def test_sends_the_request_and_reuses_the_connection() -> None:
    server = Server()
    async with serving(server) as base, Client() as client:
        first = await client.request("POST", f"{base}/v1/images?x=1", {"authorization": "Bearer k"}, b'{"a":1}')
        second = await client.request("GET", f"{base}/v1/tasks/1")
        kept = [connection for idle in client.idle.values() for connection in idle]
        assert len(kept) == 1 and kept[0].chunks == []  # an idle connection holds no old answer

    assert (first.status, first.headers, first.content) == (200, {"content-length": "2"}, b"ok")
    assert second.content == b"ok" and server.connections == 1
    head, body = server.requests[0].split(b"\r\n\r\n")
    port = base.rsplit(":", 1)[1]
    assert head.split(b"\r\n") == [
        b"POST /v1/images?x=1 HTTP/1.1",
        f"host: 127.0.0.1:{port}".encode(),
        b"authorization: Bearer k",
        b"user-agent: qubax",
        b"accept: */*",
        b"accept-encoding: identity",
        b"content-length: 7",
    ]
    assert body == b'{"a":1}'
    assert server.requests[1].startswith(b"GET /v1/tasks/1 HTTP/1.1\r\n")
    assert b"content-length" not in server.requests[1]


@pytest.mark.anyio
async def test_reads_chunked_and_unframed_bodies_and_inflates_gzip() -> None:
    packed = gzip.compress(b"x" * 5000)
    answers = [
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-length: %d\r\n\r\n%s" % (len(packed), packed),
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 1\r\n\r\n!",
        b"HTTP/1.0 200 OK\r\n\r\nuntil the end" + HANG_UP,  # no length: the body ends with the connection
    ]
    async with serving(Server(answers)) as base, Client() as client:
        replies = [await client.request("GET", f"{base}/{i}") for i in range(4)]

    assert [reply.content for reply in replies] == [b"abcde", b"x" * 5000, b"!", b"until the end"]
    assert [reply.status for reply in replies] == [200, 200, 201, 200]


@pytest.mark.anyio
async def test_a_connection_the_server_closed_is_not_reused() -> None:
    server = Server([b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok" + HANG_UP, OK])
    async with serving(server) as base, Client() as client:
        await client.request("GET", base)
        await asyncio.sleep(0.05)
        await client.request("GET", base)
        await client.request("GET", base)

    assert server.connections == 2


@pytest.mark.anyio
async def test_a_connection_the_server_closed_while_idle_is_not_reused() -> None:
    server = Server([OK + HANG_UP])  # answers, then hangs up (a keep-alive timeout on its side)
    async with serving(server) as base, Client() as client:
        for _ in range(3):
            assert (await client.request("GET", base)).content == b"ok"
            await asyncio.sleep(0.05)

    assert server.connections == 3


@pytest.mark.anyio
async def test_refused_unresolvable_and_non_http_urls_fail_before_sending() -> None:
    async with Client() as client:
        with pytest.raises(ConnectError, match="ConnectionRefusedError"):
            await client.request("GET", "http://127.0.0.1:9/")  # discard port: nothing listens
        with pytest.raises(ConnectError):
            await client.request("GET", "http://no-such-host.invalid/")
        with pytest.raises(ConnectError, match="not an http"):
            await client.request("GET", "file:///etc/passwd")
        for broken in ("http://127.0.0.1:99999/", "http://" + "ü" * 70 + ".example/"):  # port, IDNA label
            with pytest.raises(ConnectError, match="not a valid URL"):
                await client.request("GET", broken)


@pytest.mark.anyio
@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(HANG_UP, id="hang-up"),
        pytest.param(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort" + HANG_UP, id="short-body"),
        pytest.param(b"SMTP ready\r\n\r\n", id="not-http"),
        pytest.param(b"HTTP/1.1 200 OK\r\ncontent-encoding: br\r\ncontent-length: 1\r\n\r\nx", id="unknown-encoding"),
        pytest.param(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\n\r\n", id="switching-protocols"),
        pytest.param(b"HTTP/1.1 200 OK\r\n" + b"x-filler: %s\r\n" % (b"y" * 1000) * 70, id="endless-headers"),
    ],
)
async def test_broken_answers_fail_as_exchange_errors(answer: bytes) -> None:
    async with serving(Server([answer])) as base, Client() as client:
        with pytest.raises(ExchangeError):
            async with asyncio.timeout(5):  # failing, not waiting for the rest of an answer that never ends
                await client.request("POST", base, body=b"{}")
        assert client.in_use == 0 and not any(client.idle.values())


@pytest.mark.anyio
async def test_answers_over_the_limit_are_refused() -> None:
    big = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n" + b"x" * 100
    chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n64\r\n" + b"x" * 100 + b"\r\n0\r\n\r\n"
    bomb = gzip.compress(b"x" * 10_000)
    inflating = b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-length: %d\r\n\r\n%s" % (len(bomb), bomb)
    async with serving(Server([big, chunked, inflating])) as base, Client() as client:
        for _ in range(3):
            with pytest.raises(TooLarge):
                await client.request("GET", base, max_body=99)


@pytest.mark.anyio
async def test_a_cancelled_request_drops_its_connection() -> None:
    server = Server([b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"])  # the body never comes
    async with serving(server) as base, Client() as client:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await client.request("GET", base)
        assert client.in_use == 0 and not any(client.idle.values())


@pytest.mark.anyio
async def test_line_breaks_in_headers_are_refused_and_odd_paths_quoted() -> None:
    server = Server()
    async with serving(server) as base, Client() as client:
        with pytest.raises(ValueError, match="line break"):
            await client.request("GET", base, {"authorization": "Bearer k\r\nx-evil: 1"})
        await client.request("GET", f"{base}/a b/ü?q=%2B")

    assert server.requests == [server.requests[0]]  # the refused one never went out
    assert server.requests[0].startswith(b"GET /a%20b/%C3%BC?q=%2B HTTP/1.1\r\n")


@pytest.fixture(scope="module")
def authority() -> trustme.CA:
    return trustme.CA()


@pytest.mark.anyio
async def test_tls_verifies_the_certificate(authority: trustme.CA) -> None:
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(tls)
    trusting = ssl.create_default_context()
    authority.configure_trust(trusting)
    async with serving(Server(), tls) as base:
        async with Client(ssl_context=trusting) as client:
            assert (await client.request("GET", base)).content == b"ok"
        async with Client() as client:  # the system's authorities do not know ours
            with pytest.raises(ConnectError, match="SSLCertVerificationError"):
                await client.request("GET", base)
