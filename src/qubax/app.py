"""`create_app(settings)`: wires everything; the lifespan owns the long-lived objects (`services.py`)."""

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.telemetry import TelemetryConfig
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qubax import console
from qubax.api import admin, admin_token, docs, routes
from qubax.background import lifecycle, runner, webhooks
from qubax.errors import InvalidRequest, QubaxError, RequestTooLarge, invalid_input
from qubax.protocol import Error, ErrorResponse
from qubax.providers.registry import PROVIDERS, default_concurrency
from qubax.routing.catalog_file import load_catalog
from qubax.server.logs import log_access
from qubax.server.metrics import Metrics
from qubax.server.services import open_services
from qubax.server.settings import Settings, admin_token_problem, host_patterns
from qubax.server.traces import ServerSpans, configure, running

logger = logging.getLogger("qubax")


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app; raises `CatalogError` at once when the operator's catalog file is wrong, `ValueError`
    when its admin token could be guessed (one given here, not read by `Settings()`, which refuses it)."""
    settings = settings or Settings()
    token = settings.admin_token.get_secret_value() if settings.admin_token else ""
    if token and (problem := admin_token_problem(token)):
        raise ValueError(f"QUBAX_ADMIN_TOKEN: {problem}.")
    catalog = load_catalog(settings.catalog, set(PROVIDERS), default_concurrency())
    metrics = Metrics()  # a registry per app, not the process-wide default: tests run many apps at once
    tracing = configure(settings.trace_prompts)  # None unless OTEL_EXPORTER_OTLP_ENDPOINT is set

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        logging.getLogger("uvicorn.access").addFilter(hide_query)
        async with running(tracing), open_services(settings, catalog, metrics) as services:
            app.state.services = services
            background = [
                asyncio.create_task(runner.run_forever(services)),
                asyncio.create_task(webhooks.deliver_forever(services)),
                asyncio.create_task(lifecycle.read_forever(services)),
            ]
            try:
                yield
            finally:  # before the services close: running jobs go back to the queue
                for task in background:
                    task.cancel()
                await asyncio.gather(*background, return_exceptions=True)

    # FastAPI's built-in OpenTelemetry hooks look up global providers on every request, and would export
    # our image links' signatures with their URLs: `server/traces.py` makes the spans instead.
    telemetry: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False}
    app = FastAPI(
        title=docs.TITLE,
        version=docs.VERSION,
        description=docs.DESCRIPTION,
        lifespan=lifespan,
        telemetry=telemetry,
        docs_url=None,
        redoc_url=None,
        # Bodies without a Content-Type are read as JSON, as OpenAI reads them. The CSRF this guards
        # against needs no header, and every endpoint here needs an Authorization header.
        strict_content_type=False,
    )
    app.include_router(routes.router)
    if admin_token.enabled(settings):  # without an admin token, the admin API does not exist: /admin/... is a 404
        app.include_router(admin.router)
        app.include_router(admin.metrics_router)
        console.add_console(app)
    else:
        app.include_router(admin.off_router)
    docs.add_docs(app, routes.router)
    app.add_exception_handler(QubaxError, render_error)
    app.add_exception_handler(RequestValidationError, render_validation_error)
    app.add_exception_handler(HTTPException, render_http_exception)
    if settings.allowed_hosts:
        app.add_middleware(AllowedHosts, patterns=host_patterns(settings.allowed_hosts))
    app.add_middleware(RequestLog, metrics=metrics, access_log=settings.access_log)  # sees all
    if tracing is not None:  # outermost: its span covers the rest, and sees a crash's 500
        app.add_middleware(ServerSpans, tracing=tracing)
    return app


def hide_query(record: logging.LogRecord) -> bool:
    """Keep image URL signatures (capabilities, like keys) out of access logs."""
    args = record.args
    if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str):
        record.args = (args[0], args[1], args[2].split("?", 1)[0], args[3], args[4])
    return True


def error_response(status: int, body: ErrorResponse, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


async def render_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, QubaxError)
    return error_response(exc.status_code, exc.to_body(), exc.headers)


async def render_validation_error(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422 said as OpenAI says it: a 400 naming the first offending field."""
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    error = invalid_input(errors[0]) if errors else InvalidRequest("The request is not valid.")
    return await render_error(request, error)


async def render_http_exception(request: Request, exc: Exception) -> JSONResponse:
    """The framework's own refusals (unknown path, wrong method, body too large)."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 413:
        return await render_error(request, RequestTooLarge(str(exc.detail)))
    status, message, headers = exc.status_code, str(exc.detail), dict(exc.headers or {})
    if status == 404:
        message = f"Invalid URL ({request.method} {request.url.path})"
    if status in (404, 405) and under_v1(request):
        status, headers = 404, {}
        message = (
            f"Invalid URL ({request.method} {request.url.path}): the base URL must end in /v1, "
            f"as in {str(request.base_url).rstrip('/')}/v1."
        )
    body = ErrorResponse(error=Error(message=message, type="invalid_request_error", param=None, code=None))
    return error_response(status, body, headers)


def under_v1(request: Request) -> bool:
    """Whether the path is an API endpoint's without its /v1: a client whose base URL lacks it (the
    download route `/images/{name}` would otherwise answer its POSTs with a 405)."""
    if request.url.path.startswith("/v1/"):
        return False
    scope = {**request.scope, "path": "/v1" + request.url.path}
    return any(route.matches(scope)[0] == Match.FULL for route in request.app.router.routes)


class RequestLog:
    """What every HTTP response gets: an `x-request-id`, a count in the metrics, an access line, and an
    OpenAI-shaped 500 (with that id) for a crash."""

    def __init__(self, app: ASGIApp, metrics: Metrics, access_log: bool) -> None:
        self.app = app
        self.metrics = metrics
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
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
            await self.app(scope, receive, send_with_id)
        except Exception:
            logger.exception("unhandled error in request %s", request_id, extra={"fields": {"request_id": request_id}})
            if status:
                raise
            await crash_response(request_id)(scope, receive, send_with_id)
        finally:
            self.metrics.count_response(scope["method"], scope["path"], status or 499)
            if self.access_log:
                log_access(scope, status or 499, began, request_id)  # no status sent: the client left


class AllowedHosts:
    """Refuses requests whose Host header names none of the operator's hosts (`QUBAX_ALLOWED_HOSTS`):
    without `QUBAX_PUBLIC_URL`, that header is the host of the image URLs we hand out. Starlette's
    `TrustedHostMiddleware` decides; its plain-text refusal is answered as OpenAI answers errors instead."""

    def __init__(self, app: ASGIApp, patterns: list[str]) -> None:
        self.app = app
        self.check = TrustedHostMiddleware(admitted, patterns, www_redirect=False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refused = False

        async def refuse(message: Message) -> None:  # the check sends only when it refuses
            nonlocal refused
            refused = True

        if scope["type"] == "http":
            await self.check(scope, receive, refuse)
        if refused:
            message = "The Host header names a host this server does not answer for."
            refusal = InvalidRequest(message, code="invalid_host")
            await error_response(refusal.status_code, refusal.to_body())(scope, receive, send)
            return
        await self.app(scope, receive, send)


async def admitted(scope: Scope, receive: Receive, send: Send) -> None:
    """The check's own app: a request it lets through goes on to `AllowedHosts.app` afterwards."""


def crash_response(request_id: str) -> JSONResponse:
    body = ErrorResponse(
        error=Error(
            message=f"The server had an error while processing your request (request id {request_id}).",
            type="server_error",
            param=None,
            code=None,
        )
    )
    return error_response(500, body)
