"""`create_app(settings)`: wires everything; the lifespan owns the long-lived objects."""

import asyncio
import contextlib
import gc
import logging
import secrets
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.telemetry import TelemetryConfig
from starlette.exceptions import HTTPException
from starlette.types import Message, Receive, Scope, Send

from qubax import admin, db, s3
from qubax.breaker import Breakers
from qubax.catalog_file import load_catalog
from qubax.client import Client
from qubax.errors import InvalidRequest, QubaxError
from qubax.images import Services
from qubax.ledger import Ledger
from qubax.logs import log_access
from qubax.metrics import Metrics
from qubax.protocol import Error, ErrorResponse
from qubax.providers.registry import PROVIDERS, build_providers, default_concurrency
from qubax.quota import Quotas, limiter_storage
from qubax.routes import GENERATIONS_PATH, create_image, router
from qubax.settings import Settings
from qubax.slots import open_slots
from qubax.storage import LocalStorage, Storage, signing_secret

logger = logging.getLogger("qubax")
GC_THRESHOLD = 20_000  # allocations between young-generation collections; the default is 700


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app; raises `CatalogError` at once when the operator's catalog file is wrong."""
    settings = settings or Settings()
    catalog = load_catalog(settings.catalog, set(PROVIDERS), default_concurrency())
    metrics = Metrics()  # a registry per app, not the process-wide default: tests run many apps at once

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        logging.getLogger("uvicorn.access").addFilter(hide_query)
        async with contextlib.AsyncExitStack() as held:  # closed in reverse: the ledger before the engine
            engine = db.connect(settings.resolved_database_url)
            held.push_async_callback(engine.dispose)
            await db.migrate(engine)
            storage = await held.enter_async_context(open_storage(settings))
            http = await held.enter_async_context(open_http())
            # A slot outlives no request: its hold lapses after the longest one could take.
            slots = await held.enter_async_context(
                open_slots(settings.redis_url, settings.request_timeout_seconds + 60)
            )
            providers = build_providers(settings, http, dict(catalog.concurrency), slots)
            breakers = Breakers(settings.breaker_failures, settings.breaker_cooldown_seconds)
            sessions = db.sessions(engine)
            ledger = Ledger(engine)
            held.push_async_callback(ledger.close)
            quotas = Quotas(sessions, slots, limiter_storage(settings.redis_url))
            app.state.services = Services(
                settings, engine, sessions, http, storage, catalog, providers, breakers, ledger, quotas, metrics
            )
            sweeper = asyncio.create_task(sweep_forever(storage, settings.sweep_interval_seconds))
            held.push_async_callback(stop, sweeper)
            settle_garbage_collector()
            yield

    # FastAPI's built-in OpenTelemetry hooks look up global providers on every request; we do not use them.
    telemetry: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False}
    app = Qubax(title="Qubax Images", version="0.1.0", lifespan=lifespan, telemetry=telemetry)
    app.access_log = settings.access_log
    app.metrics = metrics
    app.include_router(router)
    if admin.enabled(settings):  # without an admin token, the admin API does not exist: /admin/... is a 404
        app.include_router(admin.router)
        app.include_router(admin.metrics_router)
    app.add_exception_handler(QubaxError, render_error)
    app.add_exception_handler(RequestValidationError, render_validation_error)
    app.add_exception_handler(HTTPException, render_http_exception)
    return app


@contextlib.asynccontextmanager
async def open_http() -> AsyncIterator[Client]:
    """The one upstream HTTP client (`qubax.client`: measured against aiohttp and httpx in bench/README.md).
    No read timeout of its own: the request deadline bounds every upstream call, and must be what fires."""
    async with Client() as http:
        yield http


async def stop(task: "asyncio.Task[None]") -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def settle_garbage_collector() -> None:
    """Move everything built at start (modules, the catalog, SQLAlchemy's mappers) out of the collector's
    sight, and let it run less often: with ~100 MB of long-lived objects, full collections triggered
    by per-request garbage cost ~15% of the light benchmark's CPU (bench/README.md)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])


def hide_query(record: logging.LogRecord) -> bool:
    """Keep image URL signatures (capabilities, like keys) out of access logs."""
    args = record.args
    if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str):
        record.args = (args[0], args[1], args[2].split("?", 1)[0], args[3], args[4])
    return True


@contextlib.asynccontextmanager
async def open_storage(settings: Settings) -> AsyncIterator[Storage]:
    """Where `QUBAX_STORAGE_URL` says images live: `s3://bucket/prefix` (one client for the app's life),
    `file:///path`, or by default the data folder."""
    secret, ttl = signing_secret(settings), settings.image_ttl_seconds
    url = urllib.parse.urlsplit(settings.storage_url or "")
    if url.scheme == "s3" and url.netloc:
        async with s3.connect() as client:
            yield s3.S3Storage(client, url.netloc, url.path, secret, ttl, own_links=bool(settings.public_url))
    elif url.scheme in ("", "file") and url.netloc in ("", "localhost"):
        local = LocalStorage(Path(urllib.parse.unquote(url.path)) if url.path else settings.images_dir, secret, ttl)
        try:
            yield local
        finally:
            await local.close()
    else:
        raise ValueError("QUBAX_STORAGE_URL must be s3://bucket/prefix or file:///absolute/path.")


async def sweep_forever(storage: Storage, interval: float) -> None:
    while True:
        try:
            removed = await storage.sweep()
            if removed:
                logger.info("swept %d expired images", removed)
        except (OSError, QubaxError):  # the disk or the bucket failed; the next round may do better
            logger.exception("sweeping expired images failed")
        await asyncio.sleep(interval)


def error_response(status: int, body: ErrorResponse, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


async def render_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, QubaxError)
    return error_response(exc.status_code, exc.to_body(), exc.headers)


async def render_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    detail = exc.errors()[0] if exc.errors() else {}
    param = str(detail.get("loc", ["", ""])[-1]) or None
    error = InvalidRequest(f"Invalid value for '{param}': {detail.get('msg', 'invalid')}.", param=param)
    return error_response(400, error.to_body())


async def render_http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    message = f"Invalid URL ({request.method} {request.url.path})" if exc.status_code == 404 else str(exc.detail)
    body = ErrorResponse(error=Error(message=message, type="invalid_request_error", param=None, code=None))
    return error_response(exc.status_code, body, dict(exc.headers or {}))


class Qubax(FastAPI):
    """FastAPI, plus what every HTTP response gets: an `x-request-id`, and an OpenAI-shaped 500 for a crash.

    `POST /v1/images/generations`, the hot path, goes straight to its endpoint: FastAPI's middleware
    stack (five layers, each wrapping `send`) cost ~10% of a light request's CPU and does nothing for it.
    """

    access_log = True
    metrics: Metrics  # set by create_app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        request_id = "req_" + secrets.token_hex(16)
        began = time.perf_counter()
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            if scope["path"] == GENERATIONS_PATH and scope["method"] == "POST":
                scope["app"] = self
                await respond(create_image, Request(scope, receive), send_with_id)
            else:
                await super().__call__(scope, receive, send_with_id)
        except Exception:
            logger.exception("unhandled error in request %s", request_id, extra={"fields": {"request_id": request_id}})
            if status:
                raise
            await crash_response(request_id)(scope, receive, send_with_id)
        finally:
            self.metrics.count_response(scope["method"], scope["path"], status or 499)
            if self.access_log:
                log_access(scope, status or 499, began, request_id)  # no status sent: the client left


async def respond(endpoint: Callable[[Request], Awaitable[Response]], request: Request, send: Send) -> None:
    try:
        response = await endpoint(request)
    except QubaxError as exc:
        response = await render_error(request, exc)
    await response(request.scope, request.receive, send)


def crash_response(request_id: str) -> Any:
    body = ErrorResponse(
        error=Error(
            message=f"The server had an error while processing your request (request id {request_id}).",
            type="server_error",
            param=None,
            code=None,
        )
    )
    return error_response(500, body)
