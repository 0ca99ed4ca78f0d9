"""A small forwarding HTTP proxy on loopback, for tests of how the upstream session finds and uses proxies.

It serves in the test's own event loop. Plain-HTTP requests in absolute form (`POST http://host:port/path
HTTP/1.1`) are forwarded to their target and the answer relayed, one request per connection; `CONNECT
host:port` opens a tunnel that carries bytes both ways (TLS inside it stays end to end). Every request
line it receives is recorded in `seen`, in order.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authorization", "te", "upgrade"}


class ForwardingProxy:
    def __init__(self) -> None:
        self.seen: list[str] = []  # "POST http://127.0.0.1:1234/v1/x" or "CONNECT 127.0.0.1:1234"
        self.port = 0
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _version = lines[0].split(" ", 2)
            self.seen.append(f"{method} {target}")
            headers = [tuple(part.strip() for part in line.split(":", 1)) for line in lines[1:] if line]
            if method == "CONNECT":
                await self.tunnel(target, reader, writer)
            else:
                await self.forward(method, target, headers, reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        except asyncio.CancelledError:
            pass  # by close(); Python 3.11's asyncio would log a handler that ends cancelled as an error
        finally:
            writer.close()
            self._tasks.discard(task)

    async def tunnel(self, target: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = target.rsplit(":", 1)
        try:
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
        except OSError:
            writer.write(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            return
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            up_writer.close()

    async def forward(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, ...]],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        parts = urlsplit(target)
        if parts.scheme != "http" or not parts.hostname:
            writer.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            return
        length = next((int(value) for name, value in headers if name.lower() == "content-length"), 0)
        body = await reader.readexactly(length)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        kept = [f"{name}: {value}" for name, value in headers if name.lower() not in HOP_BY_HOP]
        request = "\r\n".join([f"{method} {path} HTTP/1.1", *kept, "connection: close", "", ""])
        up_reader, up_writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
        try:
            up_writer.write(request.encode("latin-1") + body)
            # The answer's head, with its hop-by-hop headers replaced: we close once it is relayed.
            answer = (await up_reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            relayed = [line for line in answer[1:] if line and line.split(":", 1)[0].lower() not in HOP_BY_HOP]
            writer.write("\r\n".join([answer[0], *relayed, "connection: close", "", ""]).encode("latin-1"))
            await pipe(up_reader, writer)
        finally:
            up_writer.close()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until the reading side ends, then end the writing side (half-close where it can)."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.close()


@contextlib.asynccontextmanager
async def forwarding_proxy() -> AsyncIterator[ForwardingProxy]:
    """A proxy listening on 127.0.0.1 (a free port) for the life of the block, in the running loop."""
    proxy = ForwardingProxy()
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
    proxy.port = server.sockets[0].getsockname()[1]
    try:
        yield proxy
    finally:
        server.close()
        await proxy.close()
        await server.wait_closed()
