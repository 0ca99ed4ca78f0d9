"""The limits `qubax serve` puts on each client connection, for a server on the open internet.

uvicorn (with httptools) reads a request head of any size, waits forever for a head or a body sent a
byte at a time, and after answering early (a 401, a 413) goes on reading whatever body the client
keeps sending. `GuardedConnection` is uvicorn's own httptools protocol, handed to it through its
documented `http=` option, with these limits added; everything else (parsing, keep-alive, flow
control, the ASGI cycle) stays uvicorn's.

    head larger than `max_header_bytes`         431, connection closed
    request target longer than `max_url_bytes`  414, connection closed
    no complete head within `header_timeout`    408 (closed silently if nothing came), from the
                                                connection's start or the end of the last response
    no complete body within `body_timeout`      408 if nothing was answered yet, connection closed
    response sent before the body was read      connection closed instead of reading the rest
    more than `max_connections` open            the new connection is closed at once

`max_connections` is by default what the process's file-descriptor limit can hold (`connection_bound`).
"""

import asyncio
import functools
import json
import logging
import resource
from dataclasses import dataclass

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from qubax.server.settings import Settings

logger = logging.getLogger("qubax")
# Descriptors kept for everything but client connections and their upstream calls: the listening
# socket, the database, Redis, image files, logs, the ledger writer's pipes.
RESERVED_DESCRIPTORS = 256


@dataclass(frozen=True)
class ConnectionLimits:
    max_header_bytes: int
    max_url_bytes: int
    header_timeout: float
    body_timeout: float
    max_connections: int


@functools.cache
def configured_limits() -> ConnectionLimits:
    """Read from the environment once per server process (each worker reads its own, the same)."""
    settings = Settings()
    return ConnectionLimits(
        settings.max_header_bytes,
        settings.max_url_bytes,
        settings.header_timeout_seconds,
        settings.body_timeout_seconds,
        settings.max_connections or connection_bound(resource.getrlimit(resource.RLIMIT_NOFILE)[0]),
    )


def connection_bound(descriptors: int) -> int:
    """Client connections a process with this many file descriptors can hold: each may be waiting on an
    upstream connection of its own, so half of what is left once the reserve is set aside."""
    return max(1, (descriptors - min(RESERVED_DESCRIPTORS, descriptors // 2)) // 2)


def raise_descriptor_limit() -> int:
    """Raise this process's file-descriptor limit to the most it may have (its hard limit), as nginx's
    `worker_rlimit_nofile` or systemd's `LimitNOFILE` would; the limit it has now. Children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:  # an unlimited hard limit, or macOS's OPEN_MAX
        logger.warning("could not raise the file-descriptor limit from %d: %s", soft, exc)
        return soft
    return hard


def refusal(status: int, reason: str, message: str, code: str) -> bytes:
    """A whole response, written before any app sees the request: still OpenAI's error body."""
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    body = json.dumps({"error": error}).encode()
    head = f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
    return head.encode() + b"connection: close\r\n\r\n" + body


TOO_LARGE = refusal(431, "Request Header Fields Too Large", "The request's headers are too large.", "headers_too_large")
URL_TOO_LONG = refusal(414, "URI Too Long", "The request's URL is too long.", "url_too_long")
TIMED_OUT = refusal(408, "Request Timeout", "The request was not received in time.", "request_timeout")


class GuardedConnection(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.guard = configured_limits()
        self.refused = False
        self.in_head = False  # between a request's first byte and the end of its head
        self.head_bytes = 0  # of the head, as the parser reports its parts
        self.head_chunks = 0  # bytes received while the head was incomplete
        self.heard = False  # any byte on this connection yet
        self.timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        if len(self.connections) > self.guard.max_connections:
            self.refused = True
            transport.close()
            return
        self.timer = self.loop.call_later(self.guard.header_timeout, self.time_out)

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        if self.timer is None and (self.cycle is None or self.cycle.response_complete):
            # The next request on a kept-alive connection: its head gets the same time as the first's.
            self.timer = self.loop.call_later(self.guard.header_timeout, self.time_out)
        self.heard = True
        if self.in_head:
            self.head_chunks += len(data)
        super().data_received(data)
        # httptools reports a header only once it ends, keeping it meanwhile: one that never ends is
        # caught here, one chunk (at most 256 KiB) past the limit.
        if self.in_head and self.head_chunks > self.guard.max_header_bytes:
            self.refuse(TOO_LARGE)

    def on_message_begin(self) -> None:
        self.in_head, self.head_bytes, self.head_chunks = True, 0, 0
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self.head_bytes += len(url)
        if len(self.url) + len(url) > self.guard.max_url_bytes:
            self.refuse(URL_TOO_LONG)
        elif not self.refused:
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value) + 4  # ": " and CRLF
        if self.head_bytes > self.guard.max_header_bytes:
            self.refuse(TOO_LARGE)
        elif not self.refused:
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self.refused:
            return
        self.in_head = False
        self.stop_timer()
        self.timer = self.loop.call_later(self.guard.body_timeout, self.time_out)
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self.refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self.refused:
            return
        self.stop_timer()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        if self.cycle is not None and self.cycle.more_body:
            # Answered before the body was read (a 401, a 413): reading the rest would only let the
            # client go on sending.
            self.stop_timer()
            self.transport.close()
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop_timer()
        super().connection_lost(exc)

    def time_out(self) -> None:
        self.timer = None
        if self.transport.is_closing():
            return
        answered = self.cycle is not None and self.cycle.response_started and not self.cycle.response_complete
        if self.heard and not answered:
            self.transport.write(TIMED_OUT)
        self.transport.close()

    def refuse(self, answer: bytes) -> None:
        if not self.refused:
            self.refused = True
            self.stop_timer()
            self.transport.write(answer)
            self.transport.close()

    def stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
