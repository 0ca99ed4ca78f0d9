"""The one pipeline's middle: a checked, admitted request's images produced by its routes (`failover`),
stored or inlined, and recorded (`recording`). Every way of delivering them (an answer, a stream, a
job: `pipeline`) makes them here."""

import asyncio
import dataclasses
import functools
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, TypeVar

import pybase64

from qubax.errors import UpstreamError
from qubax.pipeline import failover
from qubax.pipeline.converter import Converter
from qubax.pipeline.imaging import passes_through
from qubax.pipeline.recording import recording
from qubax.pipeline.work import Work
from qubax.protocol import Image, ImagesResponse, Usage
from qubax.providers import GeneratedImage
from qubax.records import tables
from qubax.records.ledger import GenerationRecord
from qubax.records.storage import Storage
from qubax.routing.catalog import Catalog
from qubax.routing.request import ImageRequest, PartialImage
from qubax.server import traces
from qubax.server.services import Services

T = TypeVar("T")
INLINE_BYTES = 256 * 1024  # checking and base64-ing this much beats a thread hop (bench/README.md)


@dataclass(frozen=True)
class Made:
    response: ImagesResponse
    images: list[GeneratedImage]  # as the routes made them, `delivered` (a stream's in the order they came)
    upstream: str  # the route(s) that delivered, e.g. "bfl" or "bfl+fal"
    cost_micros: int  # what the images cost the key, as the ledger records it


@dataclass(frozen=True)
class Piece:
    """A streamed image, finished (base64, with its token count)."""

    b64_json: str | bytes
    image: GeneratedImage


# A stream's, until None: what is ready to send (the adapters put the partial images they receive).
Pieces = asyncio.Queue[Piece | PartialImage | bytes | None]


async def make(work: Work, services: Services, pieces: Pieces | None = None) -> Made:
    """produce -> store -> record. With `pieces` (a stream), each image is made by a route call of its
    own, all at once, and handed on as it is ready; the last one only comes back, once it is recorded."""
    request = work.request
    async with recording(request, work.key, services, work.charge_id) as generation:
        if pieces is None:
            images, served = await failover.collect(request, work.key, services, generation.attempts)
            if request.response_format != "b64_json":  # a link is made from the bytes: not held while stored
                images = [dataclasses.replace(image, b64=None) for image in images]
            data = await store(request, images, services, work.public_url, work.job_id)
            images = [delivered(image) for image in images]
        else:
            images, served, data = await one_by_one(work, services, generation, pieces)
        count_delivered(generation, request, work.key, images, served, services.catalog)
    extra = gpt_fields(request, images) if request.model.token_prices else {}
    response = ImagesResponse(created=int(time.time()), data=data, **extra)
    return Made(response, images, generation.upstream, generation.cost_micros)


async def one_by_one(
    work: Work, services: Services, generation: GenerationRecord, pieces: Pieces
) -> tuple[list[GeneratedImage], list[str], list[Image]]:
    """The images made at once, one route call each, each inlined and handed on as it is ready (and
    counted, so that a failure later charges the images already sent) except the last."""
    request = work.request
    made: list[GeneratedImage] = []
    served: list[str] = []
    data: list[Image] = []

    async def one(index: int) -> None:
        single = dataclasses.replace(request, n=1, index=index, partials=pieces)
        images, routes = await failover.collect(single, work.key, services, generation.attempts)
        text = await inline(images[0], request, services.converter)
        made.append(delivered(images[0]))
        served.extend(routes)
        data.append(Image(b64_json=text, revised_prompt=images[0].revised_prompt))
        count_delivered(generation, request, work.key, made, served, services.catalog)
        if len(made) < request.n:
            pieces.put_nowait(Piece(text, made[-1]))

    try:
        async with asyncio.TaskGroup() as group:
            for index in range(request.n):
                group.create_task(one(index))
    except ExceptionGroup as failures:  # the first failure cancelled the other images
        raise failures.exceptions[0] from None
    return made, served, data


async def store(
    request: ImageRequest, images: list[GeneratedImage], services: Services, public_url: str, job_id: str | None = None
) -> list[Image]:
    """The images as the answer carries them: stored behind signed links, or inline as base64."""
    if len(images) != request.n:  # never answer 200 with fewer images than asked
        raise UpstreamError(f"The upstream returned {len(images)} of {request.n} images.")
    storage, converter = services.storage, services.converter
    if request.response_format == "b64_json":
        texts = await each(images, lambda image: inline(image, request, converter))
        pairs = zip(texts, images, strict=True)
        return [Image(b64_json=text, revised_prompt=image.revised_prompt) for text, image in pairs]
    ids = await each(images, lambda image: kept(image, request, converter, storage, job_id))
    urls = [await storage.link(image_id, request.output_format, public_url) for image_id in ids]
    return [Image(url=url, revised_prompt=image.revised_prompt) for url, image in zip(urls, images, strict=True)]


async def each(images: list[GeneratedImage], finish: Callable[[GeneratedImage], Awaitable[T]]) -> list[T]:
    """Every image finished, at once; the common single image without a gather or an extra task."""
    if len(images) == 1:
        return [await finish(images[0])]
    return list(await asyncio.gather(*(finish(image) for image in images)))


def delivered(image: GeneratedImage) -> GeneratedImage:
    """The image without its bytes and base64 text, once they are stored or in the answer's data: the
    rest of the request needs only its prompt, token count and settings, and a request waiting for its
    usage record to be written holds megabytes less (bench/README.md, "Issue 27 item 2")."""
    return dataclasses.replace(image, data=b"", b64=None)


def count_delivered(
    generation: GenerationRecord,
    request: ImageRequest,
    key: tables.KeyRecord,
    images: list[GeneratedImage],
    served: list[str],
    catalog: Catalog,
) -> None:
    """The images delivered so far, what made them and what they cost (test keys: nothing)."""
    generation.upstream = "+".join(dict.fromkeys(served))
    generation.images = len(images)
    generation.cost_micros = 0 if key.test else cost_micros(request, images, catalog)


def cost_micros(request: ImageRequest, images: list[GeneratedImage], catalog: Catalog) -> int:
    """What the images cost, in millionths of a US dollar. Upstream calls that reported a token count (one
    for all the images of a call) cost that count at the rates of the model they ran, which may be
    another than the one asked for (a catalog route); without counts, or rates for them, the images
    cost the requested model's price per image."""
    counted = [image.tokens for image in images if image.tokens is not None]
    spent = Decimal(0)
    for tokens in counted:
        prices = catalog.token_prices(tokens.model) or request.model.token_prices
        if prices is None:  # a count nothing can price: the price per image instead
            return request.cost_micros(len(images), test=False)
        spent += prices.cost(tokens.usage)
    return int(spent * 1_000_000) if counted else request.cost_micros(len(images), test=False)


async def inline(image: GeneratedImage, request: ImageRequest, converter: Converter) -> str | bytes:
    """The image as asked, as base64 text: the upstream's own where it passes through unchanged
    (megabytes not encoded again); base64 of a large image is made in a worker thread."""
    picture, sound = await fitted(image, request, converter)
    if sound and image.b64 is not None:
        return image.b64
    if len(picture) <= INLINE_BYTES:
        return pybase64.b64encode_as_string(picture)
    return await asyncio.to_thread(pybase64.b64encode_as_string, picture)


async def kept(
    image: GeneratedImage, request: ImageRequest, converter: Converter, store: Storage, job_id: str | None
) -> str:
    """The image as asked, stored (a job's kept with the job); returns its id."""
    picture, _ = await fitted(image, request, converter)
    with traces.span("qubax.storage.put") as span:
        if span is not None:
            span.set_attributes({"qubax.storage": type(store).__name__, "qubax.bytes": len(picture)})
        return await store.put(picture, request.output_format, job_id)


async def fitted(image: GeneratedImage, request: ImageRequest, converter: Converter) -> tuple[bytes, bool]:
    """The image's bytes in the format and size asked, and whether they are the upstream's unchanged.
    One that is not already what was asked is converted in the converter's processes. Whether it is, is
    read from its headers, on the loop; only Pillow's WebP reader walks a whole file, so a large WebP's
    check goes to a worker thread: for small ones the hop costs more."""
    data, size, output_format = image.data, (request.width, request.height), request.output_format
    if output_format == "webp" and len(data) > INLINE_BYTES:
        sound = await asyncio.to_thread(passes_through, data, *size, output_format)
    else:
        sound = passes_through(data, *size, output_format)
    return (data, True) if sound else (await converter.convert(data, *size, output_format), False)


def total_usage(usages: Iterable[Usage | None]) -> Usage | None:
    """The token counts of every upstream call together; None when no call reported one."""
    counted = [usage.model_dump() for usage in usages if usage is not None]
    if not counted:
        return None
    return Usage.model_validate(functools.reduce(add_counts, counted))


def add_counts(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two token counts (nested dicts of integers) added up; a part one of them lacks is left out."""
    return {
        name: add_counts(value, b[name]) if isinstance(value, dict) else value + b[name]
        for name, value in a.items()
        if b.get(name) is not None and value is not None
    }


def gpt_fields(request: ImageRequest, images: list[GeneratedImage]) -> dict[str, Any]:
    """What OpenAI's answer for a GPT image model carries besides the images: each setting only where
    its value is a concrete one (the SDK's strict mode refuses `auto`), the token count where known."""
    settings = images[0].settings if images else {}
    background = settings.get("background") or request.background
    quality = settings.get("quality") or request.quality
    return {
        "background": background if background in ("transparent", "opaque") else None,
        "quality": quality if quality in ("low", "medium", "high") else None,
        "output_format": request.output_format,
        "size": request.size,
        "usage": total_usage(image.tokens.usage if image.tokens else None for image in images),
    }
