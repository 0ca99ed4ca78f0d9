"""The upstream HTTP client: HTTP/1.1 over kept-alive connections, answers parsed by httptools.

Why our own: through aiohttp's ClientSession a light gateway request cost ~0.45 ms of CPU, through
this ~0.31 ms (bench/README.md). What adapters need is small: send a whole request, read a whole
answer up to a size limit, keep the connection for the next one, follow no redirect, go through no
proxy. Nothing is retried: a request that may have reached the server fails as an `ExchangeError`,
and only a `ConnectError` says that nothing was sent.
"""

import asyncio
import functools
import ssl
import time
import zlib
from collections import deque
from collections.abc import Mapping
from typing import NamedTuple, cast
from urllib.parse import quote, urlsplit

import httptools

CONNECT_TIMEOUT = 10.0
# Servers close idle connections after their own timeout (nginx: 75 s); one idle this long may be
# closing as we write to it, and a request lost that way cannot be retried.
IDLE_SECONDS = 15.0
MAX_IDLE = 64  # idle connections kept per origin
MAX_BODY_BYTES = 64 * 1024 * 1024  # of any one answer, JSON or image, unless the caller says otherwise
MAX_HEAD_BYTES = 64 * 1024  # of an answer's status line and headers (the parser sets no limit of its own)
DEFAULT_HEADERS = {"user-agent": "qubax", "accept": "*/*", "accept-encoding": "identity"}
URL_SAFE = "!#$%&'()*+,/:;=?@[]~"  # left as they are when a URL's non-ASCII characters are quoted

Origin = tuple[str, str, int]  # scheme, host, port


class ClientError(Exception):
    """An exchange with an upstream failed."""


class ConnectError(ClientError):
    """No connection was made: the request was not sent."""


class ExchangeError(ClientError):
    """The connection broke, or the answer was not HTTP, after the request may have been sent."""


class TooLarge(ClientError):
    """The answer is larger than the caller accepts."""


class Response(NamedTuple):
    status: int
    headers: dict[str, str]  # names in lower case; repeated headers joined with ", "
    content: bytes


class Client:
    """Requests to any number of origins; close() when done."""

    def __init__(self, connect_timeout: float = CONNECT_TIMEOUT, ssl_context: ssl.SSLContext | None = None) -> None:
        self.connect_timeout = connect_timeout
        self.ssl_context = ssl_context or ssl.create_default_context()
        self.idle: dict[Origin, deque[Connection]] = {}
        self.in_use = 0  # connections an exchange holds now

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        max_body: int = MAX_BODY_BYTES,
    ) -> Response:
        origin, host, target = locate(url)
        head = request_head(method, target, host, headers or {}, body)
        connection = self.reuse(origin) or await self.connect(origin)
        self.in_use += 1
        try:
            response = await connection.exchange(head + body if body else head, max_body)
        except BaseException:  # cancelled too: the answer would arrive on a connection nobody reads
            connection.close()
            raise
        finally:
            self.in_use -= 1
        if connection.reusable():
            self.keep(origin, connection)
        else:
            connection.close()
        return response

    async def close(self) -> None:
        for idle in self.idle.values():
            while idle:
                idle.pop().close()

    def reuse(self, origin: Origin) -> "Connection | None":
        idle = self.idle.get(origin)
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if connection.reusable() and now - connection.idle_since < IDLE_SECONDS:
                return connection
            connection.close()
        return None

    def keep(self, origin: Origin, connection: "Connection") -> None:
        idle = self.idle.setdefault(origin, deque())
        if len(idle) >= MAX_IDLE:
            connection.close()
            return
        connection.idle_since = time.monotonic()
        idle.append(connection)

    async def connect(self, origin: Origin) -> "Connection":
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                tls = self.ssl_context if scheme == "https" else None
                _, connection = await loop.create_connection(Connection, host, port, ssl=tls)
        except (OSError, TimeoutError) as exc:  # refused, unresolvable, a certificate we do not trust, slow
            raise ConnectError(type(exc).__name__) from exc
        return connection


@functools.lru_cache(maxsize=1024)
def locate(url: str) -> tuple[Origin, str, str]:
    """Where a URL points: its origin, its Host header and its request target."""
    try:
        parts = urlsplit(url)
        port, host = parts.port, parts.hostname or ""
        name = host if host.isascii() else host.encode("idna").decode("ascii")
    except ValueError as exc:  # a port out of range, a host name IDNA cannot spell (UnicodeError)
        raise ConnectError(f"not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not host:
        raise ConnectError("not an http(s) URL")
    default = 443 if parts.scheme == "https" else 80
    name = f"[{name}]" if ":" in name else name
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if not (target.isascii() and target.isprintable()) or " " in target:
        target = quote(target, safe=URL_SAFE)
    origin = (parts.scheme, host, port or default)
    return origin, name if port in (None, default) else f"{name}:{port}", target


def request_head(method: str, target: str, host: str, headers: Mapping[str, str], body: bytes | None) -> bytes:
    given = "".join(headers) + "".join(headers.values())
    if "\r" in given or "\n" in given or "\0" in given:
        # A header from configuration (a key with a line break in it) must not split the request.
        raise ValueError("an HTTP header name or value holds a line break")
    lines = [f"{method} {target} HTTP/1.1", f"host: {host}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    names = {name.lower() for name in headers}
    lines += [f"{name}: {value}" for name, value in DEFAULT_HEADERS.items() if name not in names]
    if body is not None or method in ("POST", "PUT", "PATCH"):
        lines.append(f"content-length: {len(body or b'')}")
    return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n"


class Connection(asyncio.Protocol):
    """One connection, one exchange at a time. httptools calls the `on_*` methods while it parses."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[Response] | None = None
        self.lost = False
        self.keep_alive = False
        self.idle_since = 0.0
        self.start(0)

    def start(self, max_body: int) -> None:
        self.max_body = max_body
        self.headers: dict[str, str] = {}
        self.chunks: list[bytes] = []
        self.head_size = 0
        self.size = 0
        self.status = 0
        self.delimited = False  # by a length or by chunks: otherwise the answer ends when the connection does
        self.failure: ClientError | None = None

    async def exchange(self, request: bytes, max_body: int) -> Response:
        assert self.transport is not None
        self.start(max_body)
        self.waiter = asyncio.get_running_loop().create_future()
        self.keep_alive = False
        self.transport.write(request)
        return await self.waiter

    def reusable(self) -> bool:
        return self.keep_alive and not self.lost and self.transport is not None and not self.transport.is_closing()

    def close(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.status >= 200 and not self.delimited and self.failure is None:
            self.finish()  # the body ran to the end of the connection (HTTP/1.0 style)
        else:
            self.fail(ExchangeError("the connection closed before the whole answer arrived"))

    def data_received(self, data: bytes) -> None:
        if self.waiter is None or self.waiter.done():
            self.close()  # nothing was asked: whatever this is, the connection is not fit for reuse
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.failure = self.failure or ExchangeError(f"the answer is not valid HTTP: {exc}")
        if self.failure is not None:
            self.fail(self.failure)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_size += len(name) + len(value)
        if self.head_size > MAX_HEAD_BYTES:
            self.failure = self.failure or ExchangeError(f"the answer's headers run over {MAX_HEAD_BYTES} bytes")
            return
        key, text = name.decode("latin-1").lower(), value.decode("latin-1")
        self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if self.status == 101:  # we never ask to switch protocols; waiting for a final answer would hang
            self.failure = self.failure or ExchangeError("the server switched protocols")
        length = self.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            self.failure = self.failure or TooLarge(f"the answer has {length} bytes")
        chunked = "chunked" in self.headers.get("transfer-encoding", "").lower()
        self.delimited = bool(length) or chunked or self.status in (204, 304) or self.status < 200

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > self.max_body:
            self.failure = self.failure or TooLarge(f"the answer has over {self.max_body} bytes")
        elif self.failure is None:
            self.chunks.append(body)

    def on_message_complete(self) -> None:
        if self.status < 200:  # an interim answer (100 Continue): the real one follows
            self.start(self.max_body)
            return
        self.keep_alive = self.parser.should_keep_alive()
        if self.failure is None:
            self.finish()

    def finish(self) -> None:
        content = b"".join(self.chunks)
        self.chunks = []  # an idle connection keeps no copy of the last answer
        encoding = self.headers.get("content-encoding", "identity").lower()
        if encoding in ("gzip", "deflate"):  # we ask for identity; a server may send these anyway
            try:
                content = inflate(content, self.max_body)
            except (zlib.error, TooLarge) as exc:
                self.fail(exc if isinstance(exc, TooLarge) else ExchangeError(f"bad {encoding} body: {exc}"))
                return
        elif encoding != "identity":
            self.fail(ExchangeError(f"the answer is encoded as {encoding}"))
            return
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(Response(self.status, self.headers, content))

    def fail(self, error: ClientError) -> None:
        self.keep_alive = False
        self.chunks = []
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(error)


def inflate(content: bytes, limit: int) -> bytes:
    decompressor = zlib.decompressobj(wbits=47)  # 32 + 15: a gzip or a zlib header, whichever is there
    data = decompressor.decompress(content, limit + 1)
    if len(data) > limit:
        raise TooLarge(f"the answer inflates to over {limit} bytes")
    return data
