"""The one service function: a checked request in, images from the first routes that can make them,
stored or inlined, and a usage record out."""

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import pybase64

from qubax import db
from qubax.catalog import Catalog, CatalogModel, ImageRequest, Route
from qubax.errors import (
    MODEL_NOT_SERVED,
    InvalidRequest,
    ModelNotFound,
    QubaxError,
    ServiceUnavailable,
    UpstreamError,
    UpstreamTimeout,
)
from qubax.imaging import convert, passes_through
from qubax.ledger import AttemptRecord, GenerationRecord
from qubax.protocol import Image, ImageEditRequest, ImageGenerateRequest, ImagesResponse, Usage
from qubax.providers import GeneratedImage
from qubax.providers.placeholder import Placeholder
from qubax.providers.registry import PROVIDERS
from qubax.services import Services
from qubax.storage import Storage
from qubax.uploads import read_uploads

logger = logging.getLogger("qubax")
TEST_UPSTREAM = "test"
INLINE_BYTES = 256 * 1024  # checking and base64-ing this much beats a thread hop (bench/README.md)


@dataclass(frozen=True)
class Generated:
    response: ImagesResponse
    upstream: str  # the route(s) that delivered, e.g. "bfl" or "bfl+fal"
    headers: dict[str, str] = field(default_factory=dict)  # the key's rate-limit state, when it has limits
    cost_micros: int = 0  # what the images cost the key, as the ledger records it


async def generate(body: ImageGenerateRequest, key: db.KeyRecord, services: Services, public_url: str) -> Generated:
    return await admit(services.catalog.check(body), key, services, public_url)


async def edit(form: ImageEditRequest, key: db.KeyRecord, services: Services, public_url: str) -> Generated:
    """`generate` for `POST /v1/images/edits`: checked, then the same way through the routes."""
    return await admit(await check_edit(form, services), key, services, public_url)


async def check_edit(form: ImageEditRequest, services: Services) -> ImageRequest:
    """An edit's fields checked first, then its uploads."""
    request = services.catalog.check_edit(form)
    images, mask = await read_uploads(form.images, form.mask, services.decoding)
    return services.catalog.check_inputs(request, form.size, images, mask)


async def admit(request: ImageRequest, key: db.KeyRecord, services: Services, public_url: str) -> Generated:
    """A checked request through the key's limits, then made; the answer carries the limits' headers."""
    async with services.quotas.hold(key, request) as rate_headers:
        generated = await produce(request, key, services, public_url)
    return Generated(generated.response, generated.upstream, rate_headers, generated.cost_micros)


async def produce(
    request: ImageRequest, key: db.KeyRecord, services: Services, public_url: str, job_id: str | None = None
) -> Generated:
    """The images for a checked, admitted request, with its generation and attempts recorded; a job's
    stored images are kept as long as the job."""
    async with recording(request, key, services) as generation:
        images, served = await collect(request, key, services, generation.attempts)
        data = await deliver(request, images, services.storage, public_url, job_id)
        count_delivered(generation, request, key, images, served, services.catalog)
    extra = gpt_fields(request, images) if request.model.token_prices else {}
    response = ImagesResponse(created=int(time.time()), data=data, **extra)
    return Generated(response, generation.upstream, cost_micros=generation.cost_micros)


class recording:  # lower case: used like a function, `async with recording(...) as generation:`
    """The usage record of one request's work, which runs inside, within the request's deadline: it is
    written when the work ends, whichever way (the client leaving too), before the exit returns. A
    class rather than `contextlib.asynccontextmanager`, whose generator costs measurably more on the
    hot path (bench/README.md)."""

    def __init__(self, request: ImageRequest, key: db.KeyRecord, services: Services) -> None:
        self.services = services
        self.generation = GenerationRecord(db.new_id("gen"), key.id, request.model.id, request.n, request.size)
        self.deadline = asyncio.timeout(services.settings.request_timeout_seconds)
        self.started = 0.0

    async def __aenter__(self) -> GenerationRecord:
        self.started = time.monotonic()
        await self.deadline.__aenter__()
        return self.generation

    async def __aexit__(self, kind: object, error: BaseException | None, traceback: Any) -> None:
        try:
            await self.deadline.__aexit__(type(error) if error else None, error, traceback)
        except TimeoutError as exc:  # the deadline passed (the work was cancelled for it)
            error = exc
        if isinstance(error, TimeoutError):
            timeout = UpstreamTimeout("The upstream did not finish within the request deadline.")
            count_timeout(self.services, self.generation.attempts)
            await finish(self.services, self.generation, self.started, timeout)
            raise timeout from error
        # CancelledError too: the client went away, and that is recorded. The error itself propagates.
        await finish(self.services, self.generation, self.started, error)


def count_delivered(
    generation: GenerationRecord,
    request: ImageRequest,
    key: db.KeyRecord,
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


async def collect(
    request: ImageRequest, key: db.KeyRecord, services: Services, attempts: list[AttemptRecord]
) -> tuple[list[GeneratedImage], list[str]]:
    """Images from the model's routes in order: a route that fails in a way another route can fix
    hands over to the next one, which makes only the images still missing."""
    if key.test:  # test keys never reach an upstream
        return await Placeholder().generate(request, request.model.id), [TEST_UPSTREAM]
    routes = usable_routes(request.model, services)
    if not routes:
        raise not_served(request.model)
    routes = [route for route in routes if len(request.images) <= (route.max_images or len(request.images))]
    if not routes:
        raise InvalidRequest(
            f"The upstreams of {request.model.id} on this server take fewer images in one edit than "
            f"{len(request.images)}.",
            param="image",
        )
    images: list[GeneratedImage] = []
    served: list[str] = []
    failure: UpstreamError | None = None
    for route in routes:
        if route.only_after and (failure is None or failure.code != route.only_after):
            continue
        if not services.breakers.allow(breaker_name(route)):
            continue
        missing = request.n - len(images)
        asked = request if missing == request.n else dataclasses.replace(request, n=missing)
        made, failure = await attempt(services, route, asked, attempts)
        images += made[:missing]
        if made:
            served.append(route_label(route, request.model))
        if len(images) == request.n:
            return images, served
        if failure is not None and not failure.failover:
            raise failure
    if failure is not None:
        raise failure
    wait = min(services.breakers.retry_after(breaker_name(route)) for route in routes)
    raise ServiceUnavailable(
        f"Every upstream for {request.model.id} is failing; the next try is in {wait:.0f}s.", retry_after=wait
    )


async def attempt(
    services: Services, route: Route, request: ImageRequest, attempts: list[AttemptRecord]
) -> tuple[list[GeneratedImage], UpstreamError | None]:
    """One route's try at `request.n` images: its images, and its failure when it fell short;
    refusals are raised."""
    name = breaker_name(route)
    record = AttemptRecord(route.provider, route.upstream_model, request.n)
    attempts.append(record)
    started = time.monotonic()
    try:
        images = await services.providers[route.provider].generate(request, route.upstream_model)
    except UpstreamError as exc:
        if exc.code == MODEL_NOT_SERVED:
            # A lasting answer about the model, not a failing route: it must not take the route out of
            # rotation, or the stand-in route that follows it (`Route.only_after`) would never be reached.
            services.breakers.release(name)
        else:
            services.breakers.failed(name)
        record.images, record.outcome = len(exc.images), exc.code or "upstream_error"
        record.error = services.mask(f"{exc.message} Detail: {exc.detail}" if exc.detail else exc.message)
        logger.warning("%s on %s: %s", record.outcome, name, record.error)
        return exc.images, exc
    except QubaxError as exc:  # a refusal such as moderation: the route works, the prompt does not
        services.breakers.succeeded(name)
        record.outcome, record.error = exc.code or "refused", exc.message
        raise
    except BaseException:
        services.breakers.release(name)
        record.outcome = "cancelled"
        raise
    finally:
        record.latency_ms = int((time.monotonic() - started) * 1000)
    services.breakers.succeeded(name)
    record.images = len(images)
    return images, None


def route_label(route: Route, model: CatalogModel) -> str:
    """How `x-qubax-route` and the ledger name a route: its provider, and the upstream model too for a
    later route on a provider an earlier one already names (dall-e-3 made by gpt-image-1.5, say)."""
    first = next(other for other in model.routes if other.provider == route.provider)
    return route.provider if first == route else f"{route.provider}:{route.upstream_model}"


def usable_routes(model: CatalogModel, services: Services) -> list[Route]:
    """The model's routes whose provider has a credential on this server."""
    return [route for route in model.routes if route.provider in services.providers]


def not_served(model: CatalogModel) -> ModelNotFound:
    needed = " or ".join(dict.fromkeys(PROVIDERS[route.provider].credential for route in model.routes))
    return ModelNotFound(
        f"The model `{model.id}` is not available on this server: the operator must set {needed} to enable it."
    )


def count_timeout(services: Services, attempts: list[AttemptRecord]) -> None:
    """The deadline passed while a route was still at work: a failure of that route, for its record and
    its breaker. A route that hangs must open its breaker as one that fails does, or every request
    waits out the deadline on it."""
    if attempts and attempts[-1].outcome == "cancelled":
        record = attempts[-1]
        record.outcome = "upstream_timeout"
        services.breakers.failed(breaker_name(Route(record.upstream, record.upstream_model)))


def breaker_name(route: Route) -> str:
    return f"{route.provider}:{route.upstream_model}"


async def deliver(
    request: ImageRequest, images: list[GeneratedImage], storage: Storage, public_url: str, job_id: str | None = None
) -> list[Image]:
    if len(images) != request.n:  # never answer 200 with fewer images than asked
        raise UpstreamError(f"The upstream returned {len(images)} of {request.n} images.")
    store = None if request.response_format == "b64_json" else storage
    if len(images) == 1:  # the common n=1 case: no gather, no extra task
        outputs = [await finish_off_loop(images[0].data, request, store, job_id)]
    else:
        finishing = (finish_off_loop(image.data, request, store, job_id) for image in images)
        outputs = await asyncio.gather(*finishing)
    pairs = zip(outputs, images, strict=True)
    if store is None:
        return [Image(b64_json=text, revised_prompt=image.revised_prompt) for text, image in pairs]
    urls = [await storage.link(image_id, request.output_format, public_url) for image_id in outputs]
    return [Image(url=url, revised_prompt=image.revised_prompt) for url, image in zip(urls, images, strict=True)]


async def finish_off_loop(data: bytes, request: ImageRequest, store: Storage | None, job_id: str | None = None) -> str:
    """The image as base64 text, or stored (returning its id; a job's image is kept with the job). The
    work that needs a worker thread (decoding, converting, base64 of a large image) gets one; small
    images that pass through as they are do not: for those the thread hop would cost more than the work."""
    size, output_format = (request.width, request.height), request.output_format
    sound = len(data) <= INLINE_BYTES and passes_through(data, *size, output_format)
    if store is None:
        if sound:
            return pybase64.b64encode_as_string(data)
        return await asyncio.to_thread(finish_image, data, *size, output_format)
    picture = data if sound else await asyncio.to_thread(convert, data, *size, output_format)
    return await store.put(picture, output_format, job_id)


def finish_image(data: bytes, width: int, height: int, output_format: str) -> str:
    """The image at the asked size and format, as base64 text."""
    return pybase64.b64encode_as_string(convert(data, width, height, output_format))


async def finish(
    services: Services,
    generation: GenerationRecord,
    started: float,
    error: BaseException | None,
) -> None:
    """Record the generation and every attempt. Only delivered images of live keys cost anything: a
    failed request has none, unless a streamed answer had sent some before it failed."""
    generation.latency_ms = int((time.monotonic() - started) * 1000)
    if error is not None:
        # Our own words for our errors; anything else (a crash) may quote foreign text.
        text = error.message if isinstance(error, QubaxError) else services.mask(str(error))
        generation.error = text[:1000] or type(error).__name__
        if isinstance(error, QubaxError):
            generation.outcome = error.code or "error"
        else:
            generation.outcome = "client_disconnected" if isinstance(error, asyncio.CancelledError) else "server_error"
    else:
        generation.outcome = "ok"
    try:
        await services.ledger.record(generation)
    except QubaxError as exc:  # not recorded, so not charged: the client hears the failure, not the images
        generation.outcome, generation.images, generation.cost_micros = exc.code or "error", 0, 0
        raise
    finally:  # counted even when the write failed or the client left: the record says what happened
        services.metrics.observe(generation)
