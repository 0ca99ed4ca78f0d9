"""Streamed answers (`stream: true`): OpenAI's server-sent events, each image sent as soon as it is ready.

Each of the `n` images is made by a route call of its own, all at once, so that the first one ready is
sent first. A GPT image model's partial images are relayed as the upstream sends them (at most
`partial_images` of them, fewer when the upstream finishes first); other models have none and send
each image's `completed` event alone. Events carry no image index: with n > 1, the events of different images
interleave, and each image ends with its own `completed` event. The last `completed` event is sent only
once the request's usage record is written; a failure after the answer started is an `error` event.
"""

import asyncio
import dataclasses
import functools
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import orjson
from fastapi.sse import KEEPALIVE_COMMENT, format_sse_event

from qubax import db
from qubax.catalog import ImageRequest
from qubax.errors import QubaxError
from qubax.generation import collect, count_delivered, finish_off_loop, recording
from qubax.protocol import Error, ErrorResponse
from qubax.providers import GeneratedImage
from qubax.services import Services

logger = logging.getLogger("qubax")
PING_SECONDS = 15.0  # a comment line this often keeps proxies from closing a quiet stream
Emit = Callable[[bytes | None], None]  # None: the stream is over
QUALITIES = ("low", "medium", "high")
BACKGROUNDS = ("transparent", "opaque")


async def open_stream(
    request: ImageRequest, key: db.KeyRecord, services: Services
) -> tuple[dict[str, str], AsyncIterator[bytes]]:
    """The headers and the events of a streamed answer. The request is admitted (or refused, raised
    here as an ordinary error answer) before the answer starts."""
    headers: dict[str, str] = {}
    events = stream(request, key, services, headers)
    await anext(events)  # admitted
    return headers, events


async def stream(
    request: ImageRequest, key: db.KeyRecord, services: Services, headers: dict[str, str]
) -> AsyncIterator[bytes]:
    """Yields once, empty, when admitted (with the limits' headers in `headers`), then the events. The
    client leaving closes this generator, which cancels the work as for an unstreamed request."""
    async with services.quotas.hold(key, request) as rate_headers:
        headers.update(rate_headers)
        yield b""
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        work = asyncio.create_task(produce(request, key, services, queue.put_nowait))
        try:
            while (event := await next_event(queue)) is not None:
                yield event
        finally:
            work.cancel()
            await asyncio.wait([work])


async def next_event(queue: "asyncio.Queue[bytes | None]") -> bytes | None:
    try:
        return await asyncio.wait_for(queue.get(), PING_SECONDS)
    except TimeoutError:
        return KEEPALIVE_COMMENT


async def produce(request: ImageRequest, key: db.KeyRecord, services: Services, emit: Emit) -> None:
    """Every image's events, the last `completed` once the usage record is written, or an `error`."""
    try:
        async with recording(request, key, services) as generation:
            last = await make_each(request, key, services, generation, emit)
        emit(last)
    except QubaxError as exc:
        emit(error_event(exc.to_body()))
    except Exception:
        logger.exception("A streamed request failed")
        error = Error(message="The server failed while making the images.", type="server_error", param=None, code=None)
        emit(error_event(ErrorResponse(error=error)))
    finally:
        emit(None)


async def make_each(request: ImageRequest, key: db.KeyRecord, services: Services, generation: Any, emit: Emit) -> bytes:
    """Make the images at once, one route call each; send each image's events as they come, except
    the last `completed` event, which is returned."""
    made: list[GeneratedImage] = []
    served: list[str] = []
    last: list[bytes] = []

    async def one(index: int) -> None:
        on_partial = functools.partial(send_partial, emit, request, itertools.count())
        single = dataclasses.replace(request, n=1, index=index, on_partial=on_partial)
        images, routes = await collect(single, key, services, generation.attempts)
        text = await finish_off_loop(images[0].data, request, None)
        made.append(images[0])
        served.extend(routes)
        count_delivered(generation, request, key, made, served, services.catalog)
        event = image_event(request, "completed", text, usage=usage_of(images[0]))
        if len(made) < request.n:
            emit(event)
        else:
            last.append(event)

    try:
        async with asyncio.TaskGroup() as group:
            for index in range(request.n):
                group.create_task(one(index))
    except ExceptionGroup as failures:  # the first failure cancelled the other images
        raise failures.exceptions[0] from None
    return last[0]


def send_partial(emit: Emit, request: ImageRequest, sent: Iterator[int], index: int, image: str) -> None:
    """One of an image's partial images, up to the `partial_images` asked for: an upstream may send
    more, and a route taking over from one that failed starts its own again."""
    if next(sent) < request.partial_images:
        emit(image_event(request, "partial_image", image, partial_image_index=index))


def image_event(request: ImageRequest, kind: str, image: str, **fields: Any) -> bytes:
    """`image_generation.<kind>` (`image_edit.<kind>` for an edit), with the settings asked for."""
    name = f"{'image_edit' if request.images else 'image_generation'}.{kind}"
    data = {
        "type": name,
        "b64_json": image,
        "created_at": int(time.time()),
        "size": request.size,
        "quality": request.quality if request.quality in QUALITIES else "auto",
        "background": request.background if request.background in BACKGROUNDS else "auto",
        "output_format": request.output_format,
        **fields,
    }
    return format_sse_event(event=name, data_str=orjson.dumps(data).decode())


def usage_of(image: GeneratedImage) -> dict[str, Any]:
    """The upstream's token count for the image; zero for models that are not billed by token."""
    if image.tokens is not None:
        return image.tokens.usage.model_dump(exclude_none=True)
    details = {"text_tokens": 0, "image_tokens": 0}
    return {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0, "input_tokens_details": details}


def error_event(body: ErrorResponse) -> bytes:
    """An error once the answer has started, as the SDK recognises one (data with an `error` key)."""
    return format_sse_event(event="error", data_str=body.model_dump_json())
