"""Server-sent events from an upstream that streams its answer (qubax.providers.events), read as they
arrive through the one session."""

import asyncio
import itertools
from collections.abc import AsyncIterator
from typing import Any

import pytest
from starlette import requests
from starlette.applications import Starlette
from starlette.responses import StreamingResponse
from starlette.routing import Route

from qubax.errors import UpstreamError
from qubax.providers.transport import open_session, send
from tests.server import serve


def event_stream(chunks: list[bytes], media_type: str = "text/event-stream") -> Starlette:
    async def answer(request: requests.Request) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            for chunk in chunks:
                yield chunk
                await asyncio.sleep(0)

        return StreamingResponse(body(), media_type=media_type)

    return Starlette(routes=[Route("/", answer, methods=["POST"])])


async def read_stream(chunks: list[bytes], media_type: str = "text/event-stream") -> tuple[list[Any], bytes]:
    seen: list[Any] = []
    with serve(event_stream(chunks, media_type)) as url:
        async with open_session() as session:
            reply = await send(session, "Fake", "POST", url + "/", json={}, events=seen.append)
    return seen, reply.content


@pytest.mark.anyio
async def test_events_are_read_whatever_their_chunks_and_line_endings() -> None:
    big = "x" * 300_000
    text = (
        ": keep-alive\r\n\r\n"
        'event: a\r\ndata: {"n": 1}\r\n\r\n'
        f'data: {{"n": 2,\ndata:  "big": "{big}"}}\n\n'
        "data: [DONE]\n\n"
    ).encode()
    # Split everywhere awkward: inside a CRLF, inside the blank line, in the middle of the big event.
    cuts = [0, 13, 14, 15, 33, 34, 35, 200, 150_000, len(text)]
    chunks = [text[a:b] for a, b in itertools.pairwise(cuts) if b > a]
    seen, last = await read_stream(chunks)
    assert seen == [{"n": 1}, {"n": 2, "big": big}]
    assert last.startswith(b'{"n": 2,')


@pytest.mark.anyio
async def test_an_unreadable_event_is_an_upstream_error_and_a_json_answer_is_read_whole() -> None:
    with pytest.raises(UpstreamError) as caught:
        await read_stream([b"data: {not json}\n\n"])
    assert caught.value.message == "The upstream sent an unreadable event." and not caught.value.failover
    seen, content = await read_stream([b'{"data": []}'], media_type="application/json")
    assert seen == [] and content == b'{"data": []}'
