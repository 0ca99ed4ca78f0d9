"""Production: a checked request's images from its model's routes, in order, each route's try counted
by its breaker and kept for the usage record; a route that fails in a way another can fix hands over
to the next, which makes only the images still missing."""

import dataclasses
import logging
import time

from qubax.errors import MODEL_NOT_SERVED, InvalidRequest, ModelNotFound, QubaxError, ServiceUnavailable, UpstreamError
from qubax.providers import GeneratedImage
from qubax.providers.placeholder import Placeholder
from qubax.providers.registry import PROVIDERS
from qubax.records import tables
from qubax.records.ledger import AttemptRecord
from qubax.routing import lifecycle
from qubax.routing.models import CatalogModel, Route
from qubax.routing.request import ImageRequest
from qubax.server import traces
from qubax.server.services import Services

logger = logging.getLogger("qubax")
TEST_UPSTREAM = "test"


async def collect(
    request: ImageRequest, key: tables.KeyRecord, services: Services, attempts: list[AttemptRecord]
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
        raise shut_down(request.model, failure)
    wait = min(services.breakers.retry_after(breaker_name(route)) for route in routes)
    raise ServiceUnavailable(
        f"Every upstream for {request.model.id} is failing; the next try is in {wait:.0f}s.", retry_after=wait
    )


async def attempt(
    services: Services, route: Route, request: ImageRequest, attempts: list[AttemptRecord]
) -> tuple[list[GeneratedImage], UpstreamError | None]:
    """One route's try at `request.n` images: its images, and its failure when it fell short;
    refusals are raised. Traced as a span saying which route, and what came of it."""
    with traces.span("qubax.upstream") as span:
        failure: UpstreamError | None = None
        try:
            made, failure = await try_route(services, route, request, attempts)
        finally:
            if span is not None:
                describe(span, route, request, attempts[-1], failure)
        return made, failure


def describe(
    span: "traces.Span", route: Route, request: ImageRequest, record: AttemptRecord, failure: UpstreamError | None
) -> None:
    """An upstream span's attributes: the record's codes and counts, never its (foreign) words."""
    span.set_attributes(
        {
            "qubax.provider": route.provider,
            "qubax.model": request.model.id,
            "qubax.upstream_model": route.upstream_model,
            "qubax.route": route_label(route, request.model),
            "qubax.images.asked": request.n,
            "qubax.images.made": record.images,
            "qubax.outcome": record.outcome,
        }
    )
    if failure is not None:  # why the next route is tried, or why none is
        span.set_attribute("qubax.failover_reason" if failure.failover else "qubax.failure", record.outcome)
    traces.prompt(span, request.prompt)


async def try_route(
    services: Services, route: Route, request: ImageRequest, attempts: list[AttemptRecord]
) -> tuple[list[GeneratedImage], UpstreamError | None]:
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


def shut_down(model: CatalogModel, failure: UpstreamError) -> QubaxError:
    """The last route's failure; when its upstream no longer serves the model and the catalog names a
    successor, a 400 naming it, as for the names the catalog lists as shut down (`Catalog.asked`)."""
    if failure.code != MODEL_NOT_SERVED or model.successor is None:
        return failure
    return lifecycle.shut_down(model.id, model.successor)


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
