"""Server-sent events from an upstream that streams its answer (aiohttp has no reader for them)."""

from collections.abc import Callable
from typing import Any

import aiohttp

from qubax.errors import UpstreamError
from qubax.providers import payload, replies


async def read_events(response: aiohttp.ClientResponse, events: Callable[[Any], None]) -> bytes:
    """Blocks of lines ended by a blank line, each `data:` line part of the event's data, which here is
    JSON. No block may pass MAX_BODY_BYTES. The last event's data is returned. An event may be
    megabytes (a whole image): each byte is scanned once."""
    buffer, scanned, carried, last = bytearray(), 0, b"", b""
    async for chunk in response.content.iter_any():
        chunk = carried + chunk  # a CR at a chunk's end may begin a CRLF
        carried = b"\r" if chunk.endswith(b"\r") else b""
        buffer += chunk[: len(chunk) - len(carried)].replace(b"\r\n", b"\n")
        while (end := buffer.find(b"\n\n", max(scanned - 1, 0))) != -1:
            last = pass_on(bytes(buffer[:end]), events) or last
            del buffer[: end + 2]
            scanned = 0
        scanned = len(buffer)
        if scanned > replies.MAX_BODY_BYTES:
            raise replies.AnswerTooLarge
    return last


def pass_on(block: bytes, events: Callable[[Any], None]) -> bytes:
    """One event's data, parsed and handed to `events`; returned (empty for a comment or `[DONE]`)."""
    data = b"\n".join(line[5:].removeprefix(b" ") for line in block.split(b"\n") if line.startswith(b"data:"))
    if not data or data == b"[DONE]":
        return b""
    try:
        event = payload.loads(data)
    except ValueError:
        raise UpstreamError("The upstream sent an unreadable event.", failover=False) from None
    events(event)
    return data
