"""The public HTTP API: each endpoint authenticates, calls one service function and returns."""

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Annotated, TypeVar

import orjson
from fastapi import APIRouter, Form, Request, Response, UploadFile
from fastapi.responses import FileResponse
from fastapi.sse import EventSourceResponse
from pydantic import BaseModel
from sqlalchemy import text

from qubax import db, generation, idempotency, job_routes, jobs, streaming
from qubax.access import AuthenticatedUploadRoute, CurrentKey, base_url, public_url
from qubax.bodies import LimitedRoute
from qubax.catalog import CatalogModel, ImageRequest
from qubax.errors import ClientDisconnected, InvalidRequest, NotFound
from qubax.job_routes import accept_job, wants_job
from qubax.protocol import (
    JOB_RESPONSE,
    STREAM_RESPONSE,
    UPLOAD_FIELDS,
    HealthStatus,
    ImageEditRequest,
    ImageGenerateRequest,
    ImagesResponse,
    Model,
    ModelList,
    ServerInfo,
    error_responses,
)
from qubax.services import Services, ServicesDep
from qubax.storage import IMAGE_NAME
from qubax.uploads import digests

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
    as_job = wants_job(request, body)
    if body.stream:
        return await stream_answer(request, key, services.catalog.check(body), GENERATIONS_PATH, body)
    if as_job:
        checked = services.catalog.check(body)
        return await respond(
            request, key, lambda: accept_job(request, key, GENERATIONS_PATH, body, checked), GENERATIONS_PATH, body
        )
    # Only links need our public address; working it out from the request costs a little on every one.
    public_url = "" if body.response_format == "b64_json" else services.settings.public_url or base_url(request.scope)

    async def make() -> Response:
        result = await generation.generate(body, key, services, public_url.rstrip("/"))
        return answer(request, key, result, body.model, body.prompt)

    return await respond(request, key, make, GENERATIONS_PATH, body)


async def create_image_edit(
    form: Annotated[ImageEditRequest, Form(media_type="multipart/form-data")], request: Request, key: CurrentKey
) -> Response:
    """Edits images (inpainting with a mask, or combining several), as OpenAI's `POST /v1/images/edits`
    does: multipart/form-data with up to 16 images (`image`, or `image[]` as the SDK sends a list), each a
    PNG, JPEG or WebP of at most 50 MB, and an optional PNG `mask` the size of the first image."""
    services: Services = request.app.state.services
    as_job = wants_job(request, form)
    uploads = [*form.images, *filter(None, [form.mask])]
    if form.stream:
        checked = await generation.check_edit(form, services)
        return await stream_answer(request, key, checked, EDITS_PATH, form, uploads)
    if as_job:
        checked = await generation.check_edit(form, services)
        return await respond(
            request, key, lambda: accept_job(request, key, EDITS_PATH, form, checked), EDITS_PATH, form, uploads
        )
    public_url = services.settings.public_url or base_url(request.scope)

    async def make() -> Response:
        result = await generation.edit(form, key, services, public_url.rstrip("/"))
        return answer(request, key, result, form.model or "", form.prompt)

    return await respond(request, key, make, EDITS_PATH, form, uploads)


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


async def respond(
    request: Request,
    key: db.KeyRecord,
    make: Callable[[], Awaitable[Response]],
    path: str,
    body: BaseModel,
    uploads: Sequence[UploadFile] = (),
) -> Response:
    """`make()`'s answer, cancelled if the client leaves. Under an `Idempotency-Key` it is made once for
    this request (its fields and its files' digests) and replayed to the same request sent again."""
    if (token := request.headers.get(idempotency.HEADER)) is None:
        return await until_disconnect(request, make())
    services: Services = request.app.state.services
    print_ = await fingerprint(path, body, uploads)
    token = idempotency.check_key(token)

    def owned() -> Awaitable[Response]:
        return idempotency.run(services, key.id, token, make)

    return await until_disconnect(
        request, idempotency.once(services, key.id, token, print_, owned, public_url(request))
    )


async def stream_answer(
    request: Request,
    key: db.KeyRecord,
    checked: ImageRequest,
    path: str,
    body: BaseModel,
    uploads: Sequence[UploadFile] = (),
) -> Response:
    """`stream: true`: the events of `streaming`, once the request is admitted. Under an
    `Idempotency-Key` they are made once, and the same request sent again gets them all at once."""
    services: Services = request.app.state.services
    if jobs.wants_async(request.headers.get("prefer")):
        raise InvalidRequest(
            "A streamed answer cannot also be a job: send stream: false with Prefer: respond-async.", param="stream"
        )
    log = {"model": checked.model.id, "route": "stream", "images": checked.n}
    request.scope["qubax.log"] = log | ({"prompt": checked.prompt} if services.settings.log_prompts else {})

    def events_answer(headers: dict[str, str], events: AsyncIterator[bytes]) -> Response:
        headers |= {"cache-control": "no-cache", "x-accel-buffering": "no"}  # no proxy may hold events back
        if key.test:
            headers["x-qubax-test"] = "true"
        return EventSourceResponse(events, headers=headers)

    def open_events() -> Awaitable[tuple[dict[str, str], AsyncIterator[bytes]]]:
        return streaming.open_stream(checked, key, services)

    if (token := request.headers.get(idempotency.HEADER)) is None:
        return events_answer(*await open_events())
    print_ = await fingerprint(path, body, uploads)
    token = idempotency.check_key(token)

    def owned() -> Awaitable[Response]:
        return idempotency.run_stream(services, key.id, token, open_events, events_answer)

    return await idempotency.once(services, key.id, token, print_, owned, public_url(request))


async def fingerprint(path: str, body: BaseModel, uploads: Sequence[UploadFile]) -> str:
    """What makes two requests the same: the endpoint, the fields and the files' digests."""
    fields = body.model_dump(exclude=UPLOAD_FIELDS, exclude_none=True)
    return idempotency.fingerprint(path, fields, await digests(list(uploads)))


def answer(request: Request, key: db.KeyRecord, result: generation.Generated, model: str, prompt: str) -> Response:
    services: Services = request.app.state.services
    log = {"model": model, "route": result.upstream, "images": len(result.response.data)}
    if services.settings.log_prompts:
        log["prompt"] = prompt
    request.scope["qubax.log"] = log  # for the access line
    headers = {"x-qubax-route": result.upstream, **result.headers}
    if key.test:
        headers["x-qubax-test"] = "true"
    # orjson writes megabytes of base64 far faster than pydantic's JSON serialiser (bench/README.md).
    content = orjson.dumps(result.response.model_dump(exclude_none=True))
    return Response(content, media_type="application/json", headers=headers)


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


@router.get("/v1/models", responses=error_responses(401), summary="List models", tags=["Models"])
async def list_models(key: CurrentKey, services: ServicesDep) -> ModelList:
    """The models this key can use, aliases included: for a live key those with an upstream configured,
    for a test key all of them."""
    models = [model for model in services.catalog.models if key.test or generation.usable_routes(model, services)]
    return ModelList(data=[model_card(model, name) for model in models for name in (model.id, *model.aliases)])


@router.get(
    "/v1/models/{model_id:path}", responses=error_responses(401, 404), summary="Retrieve model", tags=["Models"]
)
async def retrieve_model(model_id: str, key: CurrentKey, services: ServicesDep) -> Model:
    model = services.catalog.find(model_id)
    if not key.test and not generation.usable_routes(model, services):
        raise generation.not_served(model)
    return model_card(model, model_id)


def model_card(model: CatalogModel, name: str) -> Model:
    return Model(id=name, created=model.created, owned_by=model.owned_by)


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
