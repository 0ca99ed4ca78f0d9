"""The public HTTP API: each endpoint authenticates, parses, hands the request to the pipeline (through
`idempotency` under an `Idempotency-Key`) and renders what it delivers."""

import asyncio
import time
from collections.abc import Awaitable
from typing import Annotated, TypeVar

from fastapi import APIRouter, Form, Request, Response
from fastapi.responses import FileResponse
from fastapi.sse import EventSourceResponse
from sqlalchemy import text

from qubax.api import job_routes, upstream_callbacks
from qubax.api.authentication import AuthenticatedUploadRoute, CurrentKey, public_url
from qubax.api.bodies import LimitedRoute
from qubax.api.job_routes import wants_job
from qubax.errors import ClientDisconnected, InvalidRequest, NotFound
from qubax.pipeline import delivery, failover, idempotency, parsing
from qubax.pipeline.work import Delivery, Work
from qubax.protocol import (
    JOB_RESPONSE,
    STREAM_RESPONSE,
    HealthStatus,
    ImageEditRequest,
    ImageGenerateRequest,
    ImagesResponse,
    Model,
    ModelList,
    ServerInfo,
    error_responses,
)
from qubax.records.storage import IMAGE_NAME
from qubax.routing import lifecycle
from qubax.routing.models import CatalogModel
from qubax.server.services import Services, ServicesDep

T = TypeVar("T")
GENERATIONS_PATH = "/v1/images/generations"
EDITS_PATH = "/v1/images/edits"

router = APIRouter(route_class=LimitedRoute)


@router.post(
    GENERATIONS_PATH,
    response_model=ImagesResponse,
    responses=STREAM_RESPONSE | JOB_RESPONSE | error_responses(400, 401, 404, 413, 429, 502, 503, 504),
    summary="Create image",
    tags=["Images"],
)
async def create_image(body: ImageGenerateRequest, request: Request, key: CurrentKey) -> Response:
    """Creates images from a prompt, as OpenAI's `POST /v1/images/generations` does. Each image comes back
    as a signed, expiring `url` or inline as `b64_json`; failed requests cost nothing."""
    services: Services = request.app.state.services
    checked = parsing.check_generation(body, services)
    way = delivery_of(request, body)
    # Only links need our public address; working it out from the request costs a little on every one.
    links = "" if way == "answer" and body.response_format == "b64_json" else public_url(request)
    work = Work(request=checked, key=key, delivery=way, endpoint=GENERATIONS_PATH, body=body, public_url=links)
    return await respond(request, work)


async def create_image_edit(
    form: Annotated[ImageEditRequest, Form(media_type="multipart/form-data")], request: Request, key: CurrentKey
) -> Response:
    """Edits images (inpainting with a mask, or combining several), as OpenAI's `POST /v1/images/edits`
    does: multipart/form-data with up to 16 images (`image`, or `image[]` as the SDK sends a list), each a
    PNG, JPEG or WebP of at most 50 MB, and an optional PNG `mask` the size of the first image."""
    services: Services = request.app.state.services
    checked = await parsing.check_edit(form, services)
    way = delivery_of(request, form)
    work = Work(request=checked, key=key, delivery=way, endpoint=EDITS_PATH, body=form, public_url=public_url(request))
    return await respond(request, work)


# An ordinary route, with a route class of its own: uploads have their own size limit, and the key is
# checked before the upload is read.
router.add_api_route(
    EDITS_PATH,
    create_image_edit,
    methods=["POST"],
    response_model=ImagesResponse,
    responses=STREAM_RESPONSE | JOB_RESPONSE | error_responses(400, 401, 404, 413, 429, 502, 503, 504),
    summary="Create image edit",
    tags=["Images"],
    route_class_override=AuthenticatedUploadRoute,
)


def delivery_of(request: Request, body: ImageGenerateRequest | ImageEditRequest) -> Delivery:
    """How the request asks for its images: "answer", "stream" (`stream: true`) or "job" (`Prefer:
    respond-async`), which cannot be both."""
    as_job = wants_job(request, body)
    if not body.stream:
        if as_job:
            job_routes.check_job_reader(request)
        return "job" if as_job else "answer"
    if as_job:
        raise InvalidRequest(
            "A streamed answer cannot also be a job: send stream: false with Prefer: respond-async.", param="stream"
        )
    return "stream"


async def respond(request: Request, work: Work) -> Response:
    """The pipeline's answer, rendered. Under an `Idempotency-Key` it is made once for this request (its
    fields and its files' digests) and replayed to the same request sent again. An answer, or a job, is
    cancelled if the client leaves before it; a stream stops when its client leaves."""
    services: Services = request.app.state.services
    if work.delivery == "stream":
        request_ = work.request
        note(request, {"model": request_.model.id, "route": "stream", "images": request_.n}, request_.prompt)
    if (token := request.headers.get(idempotency.HEADER)) is None:
        delivered = delivery.run(work, services)
    else:
        delivered = idempotency.once(work, services, idempotency.check_key(token))
    answer = await (delivered if work.delivery == "stream" else until_disconnect(request, delivered))
    if answer.log is not None:
        note(request, answer.log, work.request.prompt)
    if answer.events is not None:
        # No proxy may hold events back.
        headers = answer.headers | {"cache-control": "no-cache", "x-accel-buffering": "no"}
        return EventSourceResponse(answer.events, headers=headers)
    return Response(answer.body, answer.status, headers=answer.headers)


def note(request: Request, log: dict[str, object], prompt: str) -> None:
    """What the access line says about the request."""
    services: Services = request.app.state.services
    request.scope["qubax.log"] = log | ({"prompt": prompt} if services.settings.log_prompts else {})


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await the work, cancelling it (and the upstream work it owns) if the client goes away first.

    The work runs in this task, and a watcher task cancels it. The watcher starts only once the work has
    run WATCH_AFTER_SECONDS: the upstream work worth saving takes seconds, and most requests that end
    sooner never need a task of their own."""
    task = asyncio.current_task()
    assert task is not None
    watcher: asyncio.Task[None] | None = None
    gone = False

    async def watch() -> None:
        nonlocal gone
        # The body has been read, so the next message the server sends is the disconnect.
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone = True
        task.cancel()

    def start_watching() -> None:
        nonlocal watcher
        watcher = asyncio.ensure_future(watch())

    timer = asyncio.get_running_loop().call_later(WATCH_AFTER_SECONDS, start_watching)
    try:
        return await work
    except asyncio.CancelledError:
        if gone and task.uncancel() == 0:
            raise ClientDisconnected("The client closed the connection before the images were ready.") from None
        raise
    finally:
        timer.cancel()
        if watcher is not None:
            watcher.cancel()


WATCH_AFTER_SECONDS = 0.1


@router.get(
    "/v1/models",
    responses=error_responses(401),
    summary="List models",
    tags=["Models"],
    response_model_exclude_none=True,
)
async def list_models(key: CurrentKey, services: ServicesDep) -> ModelList:
    """The models this key can use, aliases included: for a live key those with an upstream configured,
    for a test key all of them. `shutdown_date` where one is known (the catalog's, else the upstream's)."""
    models = [model for model in services.catalog.models if key.test or failover.usable_routes(model, services)]
    cards = [model_card(model, name, services) for model in models for name in (model.id, *model.aliases)]
    return ModelList(data=cards)


@router.get(
    "/v1/models/{model_id:path}",
    responses=error_responses(401, 404),
    summary="Retrieve model",
    tags=["Models"],
    response_model_exclude_none=True,
)
async def retrieve_model(model_id: str, key: CurrentKey, services: ServicesDep) -> Model:
    model = services.catalog.find(model_id)
    if not key.test and not failover.usable_routes(model, services):
        raise failover.not_served(model)
    return model_card(model, model_id, services)


def model_card(model: CatalogModel, name: str, services: Services) -> Model:
    ends = lifecycle.shutdown_date(model, services.published)
    return Model(id=name, created=model.created, owned_by=model.owned_by, shutdown_date=ends)


IMAGE_CONTENT = {f"image/{ext}": {"schema": {"type": "string", "format": "binary"}} for ext in ("png", "jpeg", "webp")}


@router.get(
    "/images/{name}",
    response_class=Response,
    responses={200: {"description": "The image.", "content": IMAGE_CONTENT}, **error_responses(403, 404, 410)},
    summary="Download image",
    tags=["Images"],
)
async def serve_image(name: str, services: ServicesDep, expires: str = "", signature: str = "") -> Response:
    """A stored image, through the signed link a generation returned (`img_….png?expires=…&signature=…`).
    Needs no key: the signature is the permission, until `expires`."""
    match = IMAGE_NAME.fullmatch(name)
    if match is None:
        raise NotFound("Image not found.")
    image = await services.storage.open(match[1], match[2], expires, signature)
    max_age = max(0, int(expires) - int(time.time()))
    headers = {"cache-control": f"private, max-age={max_age}"}
    if isinstance(image, bytes):  # read from a bucket
        return Response(image, media_type=f"image/{match[2]}", headers=headers)
    return FileResponse(image, media_type=f"image/{match[2]}", headers=headers)


@router.get("/", summary="What this server is", tags=["Operations"])
async def index() -> ServerInfo:
    """Where a person who opened the server's address in a browser, or an unconfigured client, starts."""
    return ServerInfo(
        name="Qubax Images",
        description="An OpenAI-compatible Images API: point an OpenAI client's base URL at /v1.",
        api_base="/v1",
        docs="/docs",
        openapi="/openapi.json",
    )


@router.get("/healthz", responses=error_responses(503), summary="Health check", tags=["Operations"])
async def healthz(services: ServicesDep) -> HealthStatus:
    """200 when the service, its database, its image store and (if configured) Redis are reachable."""
    async with services.engine.connect() as connection:
        await connection.execute(text("SELECT 1"))
    await services.quotas.slots.check()  # a node that cannot reach the shared limits is not ready
    await services.storage.ready()  # nor one that cannot keep images
    return HealthStatus(status="ok")


router.include_router(job_routes.router)  # the jobs API is part of the public API (and its schema)
router.include_router(upstream_callbacks.router)  # upstreams' callbacks to us: in the schema too
