"""Streamed answers (`stream: true`), one of the pipeline's ways of delivering: OpenAI's server-sent
events, each image sent as soon as it is ready (`generation.make` hands them on).

Each of the `n` images is made by a route call of its own, all at once, so that the first one ready is
sent first. A GPT image model's partial images are relayed as the upstream sends them (at most
`partial_images` of them, fewer when the upstream finishes first); other models have none and send
each image's `completed` event alone. Events carry no image index: with n > 1, the events of different images
interleave, and each image ends with its own `completed` event. The last `completed` event is sent only
once the request's usage record is written; a failure after the answer started is an `error` event.
"""

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

from fastapi.sse import KEEPALIVE_COMMENT, format_sse_event

from qubax.errors import QubaxError
from qubax.pipeline.generation import Piece, Pieces, make
from qubax.pipeline.work import Work
from qubax.protocol import Error, ErrorResponse
from qubax.providers import GeneratedImage, payload
from qubax.routing.request import ImageRequest, PartialImage
from qubax.server.services import Services

logger = logging.getLogger("qubax")
PING_SECONDS = 15.0  # a comment line this often keeps proxies from closing a quiet stream
QUALITIES = ("low", "medium", "high")
BACKGROUNDS = ("transparent", "opaque")


async def open_stream(work: Work, services: Services) -> tuple[dict[str, str], AsyncIterator[bytes]]:
    """The headers and the events of a streamed answer. The request is admitted (or refused, raised
    here as an ordinary error answer) before the answer starts."""
    headers: dict[str, str] = {}
    events = stream(work, services, headers)
    await anext(events)  # admitted
    return headers, events


async def stream(work: Work, services: Services, headers: dict[str, str]) -> AsyncIterator[bytes]:
    """Yields once, empty, when admitted (with the limits' headers in `headers`), then the events. The
    client leaving closes this generator, which cancels the work as for an unstreamed request."""
    async with services.quotas.hold(work.key, work.request) as rate_headers:
        headers.update(rate_headers)
        yield b""
        pieces: Pieces = asyncio.Queue()
        making = asyncio.create_task(produce(work, services, pieces))
        # Partial images sent of each image: at most `partial_images`, as an upstream may send more, and
        # a route taking over from one that failed starts its own again.
        sent: Counter[int] = Counter()
        try:
            while (piece := await next_piece(pieces)) is not None:
                if isinstance(piece, PartialImage):
                    sent[piece.image] += 1
                    if sent[piece.image] <= work.request.partial_images:
                        yield partial_event(work.request, piece)
                else:
                    yield piece if isinstance(piece, bytes) else completed_event(work.request, piece)
        finally:
            making.cancel()
            await asyncio.wait([making])


async def next_piece(pieces: Pieces) -> Piece | PartialImage | bytes | None:
    try:
        return await asyncio.wait_for(pieces.get(), PING_SECONDS)
    except TimeoutError:
        return KEEPALIVE_COMMENT


async def produce(work: Work, services: Services, pieces: Pieces) -> None:
    """Every image's pieces, the last image once the usage record is written, or an `error` event."""
    try:
        made = await make(work, services, pieces)
        pieces.put_nowait(Piece(made.response.data[-1].b64_json or "", made.images[-1]))
    except QubaxError as exc:
        pieces.put_nowait(error_event(exc.to_body()))
    except Exception:
        logger.exception("A streamed request failed")
        error = Error(message="The server failed while making the images.", type="server_error", param=None, code=None)
        pieces.put_nowait(error_event(ErrorResponse(error=error)))
    finally:
        pieces.put_nowait(None)


def completed_event(request: ImageRequest, piece: Piece) -> bytes:
    return image_event(request, "completed", piece.b64_json, usage=usage_of(piece.image))


def partial_event(request: ImageRequest, piece: PartialImage) -> bytes:
    return image_event(request, "partial_image", piece.b64_json, partial_image_index=piece.partial_image_index)


def image_event(request: ImageRequest, kind: str, image: str | bytes, **fields: Any) -> bytes:
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
    return format_sse_event(event=name, data_str=payload.dumps(data).decode())


def usage_of(image: GeneratedImage) -> dict[str, Any]:
    """The upstream's token count for the image; zero for models that are not billed by token."""
    if image.tokens is not None:
        return image.tokens.usage.model_dump(exclude_none=True)
    details = {"text_tokens": 0, "image_tokens": 0}
    return {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0, "input_tokens_details": details}


def error_event(body: ErrorResponse) -> bytes:
    """An error once the answer has started, as the SDK recognises one (data with an `error` key)."""
    return format_sse_event(event="error", data_str=body.model_dump_json())
