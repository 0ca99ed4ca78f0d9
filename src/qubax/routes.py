"""HTTP endpoints: parse, authenticate, call one service function, return."""

import asyncio
import functools
import re
import time
from collections.abc import Awaitable
from typing import Annotated, Any, TypeVar

import orjson
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import FileResponse
from pydantic import ValidationError
from sqlalchemy import text
from starlette.types import Scope

from qubax import auth, db, images
from qubax.catalog import CatalogModel
from qubax.errors import (
    AuthenticationError,
    ClientDisconnected,
    InvalidRequest,
    NotFound,
    RequestTooLarge,
    UnknownParameter,
)
from qubax.images import Services
from qubax.protocol import ImageGenerateRequest, Model, ModelList
from qubax.providers import payload as payload_json

T = TypeVar("T")
MAX_BODY_BYTES = 1024 * 1024
IMAGE_NAME = re.compile(r"(img_[A-Za-z0-9_-]{1,64})\.(png|jpeg|webp)")

router = APIRouter()


async def get_services(request: Request) -> Services:  # async: FastAPI runs plain defs in a thread
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


async def authenticate(request: Request, services: ServicesDep) -> db.KeyRecord:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationError(
            "You didn't provide an API key. You need to provide your API key in an Authorization header "
            "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            code="missing_api_key",
        )
    key = None
    if auth.looks_like_key(token):
        digest = auth.digest_key(token)

        async def find() -> db.KeyRecord | None:
            async with services.sessions() as session:
                row = await db.find_key(session, digest)
                return None if row is None else db.key_record(row)

        key = await services.keys.fetch(digest, find)
    if key is None or not auth.matches(token, key.digest):
        raise AuthenticationError(f"Incorrect API key provided: {auth.masked(token)}.")
    if key.revoked_at is not None:
        raise AuthenticationError(f"The API key {auth.masked(token)} has been revoked.")
    return key


CurrentKey = Annotated[db.KeyRecord, Depends(authenticate)]


async def create_image(request: Request) -> Response:
    """`POST /v1/images/generations`. A plain Starlette endpoint: FastAPI's dependency solving
    measurably costs this, the hot path, and it needs nothing from it."""
    services: Services = request.app.state.services
    key = await authenticate(request, services)
    body = parse_body(await read_body(request))
    # Only links need our public address; working it out from the request costs a little on every one.
    public_url = "" if body.response_format == "b64_json" else services.settings.public_url or base_url(request.scope)
    result = await until_disconnect(request, images.generate(body, key, services, public_url.rstrip("/")))
    log = {"model": body.model, "route": result.upstream, "images": len(result.response.data)}
    if services.settings.log_prompts:
        log["prompt"] = body.prompt
    request.scope["qubax.log"] = log  # for the access line
    headers = {"x-qubax-route": result.upstream, **result.headers}
    if key.test:
        headers["x-qubax-test"] = "true"
    # orjson writes megabytes of base64 ~10x faster than pydantic's JSON serialiser.
    content = orjson.dumps(result.response.model_dump(exclude_none=True))
    return Response(content, media_type="application/json", headers=headers)


def base_url(scope: Scope) -> str:
    """Starlette's `request.base_url`, remembered for each host the clients name: working it out anew
    cost ~5% of a url-mode request's instructions (bench/README.md)."""
    host = next((value for name, value in scope["headers"] if name == b"host"), None)
    root_path = scope.get("app_root_path", scope.get("root_path", ""))
    server = scope.get("server")
    return known_base_url(scope.get("scheme", "http"), host, None if server is None else tuple(server), root_path)


@functools.lru_cache(maxsize=256)  # bounded: the Host header is the client's to choose
def known_base_url(scheme: str, host: bytes | None, server: tuple[str, int | None] | None, root_path: str) -> str:
    headers = [(b"host", host)] if host is not None else []
    scope = {"type": "http", "scheme": scheme, "server": server, "root_path": root_path, "headers": headers}
    return str(Request({**scope, "path": "/", "query_string": b""}).base_url)


GENERATIONS_PATH = "/v1/images/generations"
# Registered for the docs and for 405s on other methods; `Qubax.__call__` sends POSTs straight to it.
router.add_route(GENERATIONS_PATH, create_image, methods=["POST"])


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await the work, cancelling it (and the upstream work it owns) if the client goes away first.

    The work runs in this task, and a watcher task cancels it. The watcher starts only once the work has
    run WATCH_AFTER_SECONDS: a task per request cost ~4% of a light request's instructions (bench/README.md), and
    the upstream work worth saving takes seconds."""
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


async def read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise RequestTooLarge(f"Request body is larger than the {MAX_BODY_BYTES} byte limit.")
    # ASGI messages read directly: Starlette's `request.stream()` is an async generator, measurably dearer.
    chunks, size, more = [], 0, True
    while more:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected("The client closed the connection while sending the request.")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise RequestTooLarge(f"Request body is larger than the {MAX_BODY_BYTES} byte limit.")
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks)


def parse_body(raw: bytes) -> ImageGenerateRequest:
    try:
        payload = payload_json.loads(raw)
    except ValueError as exc:
        raise InvalidRequest(
            "We could not parse the JSON body of your request. The API expects a JSON object, "
            "but what was sent was not valid JSON.",
            code="invalid_json",
        ) from exc
    if not isinstance(payload, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    try:
        return ImageGenerateRequest.model_validate(payload)
    except ValidationError as exc:
        raise validation_error(exc.errors()[0]) from exc


TYPE_NAMES = {"string_type": "a string", "int_type": "an integer", "int_from_float": "an integer"}


def validation_error(detail: Any) -> InvalidRequest:
    """One pydantic error, said the way OpenAI says it, naming the offending field."""
    field = ".".join(str(part) for part in detail["loc"]) or None
    kind = detail["type"]
    if kind == "extra_forbidden":
        return UnknownParameter(f"Unknown parameter: '{field}'.", param=field)
    if kind == "missing":
        return InvalidRequest(f"Missing required parameter: '{field}'.", param=field, code="missing_required_parameter")
    expected = TYPE_NAMES.get(kind)
    if expected is not None:
        got = type(detail.get("input")).__name__
        message = f"Invalid type for '{field}': expected {expected}, but got {got}."
        return InvalidRequest(message, param=field, code="invalid_type")
    return InvalidRequest(f"Invalid value for '{field}': {detail['msg']}.", param=field)


@router.get("/v1/models")
async def list_models(key: CurrentKey, services: ServicesDep) -> ModelList:
    models = services.catalog.models
    return ModelList(data=[model_card(model, name) for model in models for name in (model.id, *model.aliases)])


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, key: CurrentKey, services: ServicesDep) -> Model:
    return model_card(services.catalog.find(model_id), model_id)


def model_card(model: CatalogModel, name: str) -> Model:
    return Model(id=name, created=model.created, owned_by=model.owned_by)


@router.get("/images/{name}")
async def serve_image(name: str, services: ServicesDep, expires: str = "", signature: str = "") -> Response:
    match = IMAGE_NAME.fullmatch(name)
    if match is None:
        raise NotFound("Image not found.")
    image = await services.storage.open(match[1], match[2], expires, signature)
    max_age = max(0, int(expires) - int(time.time()))
    headers = {"cache-control": f"private, max-age={max_age}"}
    if isinstance(image, bytes):  # read from a bucket
        return Response(image, media_type=f"image/{match[2]}", headers=headers)
    return FileResponse(image, media_type=f"image/{match[2]}", headers=headers)


@router.get("/healthz")
async def healthz(services: ServicesDep) -> dict[str, str]:
    async with services.engine.connect() as connection:
        await connection.execute(text("SELECT 1"))
    await services.quotas.slots.check()  # a node that cannot reach the shared limits is not ready
    return {"status": "ok"}
