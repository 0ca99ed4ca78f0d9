"""OpenTelemetry traces, the `otel` extra: on when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, sent over OTLP/HTTP; the SDK reads its other standard
variables (`OTEL_TRACES_SAMPLER`, `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_BSP_*`, ...) itself.

Off, nothing here imports OpenTelemetry, and `span()` hands back one shared empty context: no span
objects on the request path. On, each request is a server span continuing the caller's W3C
`traceparent`; the pipeline adds children (upstream attempts, image storage, the ledger), and job
runs and webhook deliveries are traces of their own. Spans carry names, codes and counts: never a
key, a URL's query, an upstream's or an exception's words, nor the prompt unless `QUBAX_TRACE_PROMPTS`.

FastAPI's own OpenTelemetry spans would record every URL's query, and our image links' `signature`
is a capability it does not redact: hence the few lines of `ServerSpans` instead.
"""

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span as Span  # re-exported: callers annotate with `traces.Span`
    from opentelemetry.trace import SpanKind, Tracer

logger = logging.getLogger("qubax")
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
OFF: contextlib.nullcontext[None] = contextlib.nullcontext()


@dataclass
class Tracing:
    """One app's traces: its own provider (tests run many apps in one process), made by `configure`."""

    provider: "TracerProvider"
    tracer: "Tracer"
    exporter: "SpanExporter"
    prompts: bool  # QUBAX_TRACE_PROMPTS: the operator asked for prompts on upstream spans


# The app whose request or background task this is; set per request by `ServerSpans`, and in the
# lifespan for the tasks it starts. None: tracing is off.
CURRENT: ContextVar[Tracing | None] = ContextVar("qubax_tracing", default=None)


def configure(prompts: bool = False) -> Tracing | None:
    """The app's tracing when a collector is named and the extra is installed; None (one warning when
    a collector is named without the extra) otherwise."""
    variable = next((name for name in ENDPOINT_VARIABLES if os.environ.get(name)), None)
    if variable is None:
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
    except ImportError:
        logger.warning("%s is set, but traces need the otel extra: pip install 'qubax[otel]'. No traces.", variable)
        return None
    # Resource.create lets its argument win over OTEL_SERVICE_NAME: so the variable is read here.
    resource = Resource.create({SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME") or "qubax"})
    provider = TracerProvider(resource=resource)  # its sampler from OTEL_TRACES_SAMPLER(_ARG)
    logger.info("traces: sent over OTLP/HTTP to the collector %s names", variable)  # not its URL: it may hold a token
    return Tracing(provider, provider.get_tracer("qubax"), OTLPSpanExporter(), prompts)


@contextlib.asynccontextmanager
async def running(tracing: Tracing | None) -> AsyncIterator[None]:
    """For the app's lifespan: exports while it runs (to tasks started inside), and flushes at its end."""
    if tracing is None:
        yield
        return
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    tracing.provider.add_span_processor(BatchSpanProcessor(tracing.exporter))  # its thread starts here
    token = CURRENT.set(tracing)
    try:
        yield
    finally:
        CURRENT.reset(token)
        # Its last export is a blocking HTTP call: off the event loop, which may serve the collector.
        await asyncio.to_thread(tracing.provider.shutdown)


def span(name: str) -> contextlib.AbstractContextManager["Span | None"]:
    """A child of the current span (a root one in a background task), or `None` when tracing is off."""
    tracing = CURRENT.get()
    if tracing is None:
        return OFF
    return started(tracing.tracer, name)


@contextlib.contextmanager
def started(
    tracer: "Tracer", name: str, kind: "SpanKind | None" = None, parent: "Context | None" = None
) -> Iterator["Span"]:
    """A current span whose failure says its exception's type only: messages may quote a prompt."""
    from opentelemetry.trace import SpanKind, StatusCode

    with tracer.start_as_current_span(
        name, context=parent, kind=kind or SpanKind.INTERNAL, record_exception=False, set_status_on_exception=False
    ) as current:
        try:
            yield current
        except BaseException as exc:
            current.set_attribute("error.type", type(exc).__qualname__)
            current.set_status(StatusCode.ERROR)
            raise


def prompt(current: "Span", text: str) -> None:
    """The prompt on an upstream span, only where the operator opted in (`QUBAX_TRACE_PROMPTS`)."""
    tracing = CURRENT.get()
    if tracing is not None and tracing.prompts:
        current.set_attribute("qubax.prompt", text)


class ServerSpans:
    """A server span per HTTP request, named by its route template, continuing the caller's trace
    (the standard propagators: W3C `traceparent`, or what `OTEL_PROPAGATORS` names)."""

    def __init__(self, app: ASGIApp, tracing: Tracing) -> None:
        self.app = app
        self.tracing = tracing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from opentelemetry import propagate
        from opentelemetry.trace import SpanKind, StatusCode

        token = CURRENT.set(self.tracing)
        method = scope["method"]
        status = 0

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        parent = propagate.extract(Headers(scope=scope))
        try:
            with started(self.tracing.tracer, method, SpanKind.SERVER, parent) as current:
                current.set_attributes({"http.request.method": method, "url.scheme": scope.get("scheme", "http")})
                try:
                    await self.app(scope, receive, send_status)
                finally:
                    template = route_template(scope)
                    if template:
                        current.update_name(f"{method} {template}")
                        current.set_attribute("http.route", template)
                    current.set_attribute("http.response.status_code", status or 499)
                    if status >= 500:
                        current.set_status(StatusCode.ERROR)
        finally:
            CURRENT.reset(token)


def route_template(scope: Scope) -> str | None:
    """The path template of the route that answered: FastAPI keeps the routes of an included router as
    they were declared (`/webhooks`), and the whole template (`/admin/webhooks`) in the scope beside them."""
    fastapi = scope.get("fastapi")
    effective = fastapi.get("effective_route_context") if isinstance(fastapi, dict) else None
    template = getattr(effective, "path", None) or getattr(scope.get("route"), "path", None)
    return template if isinstance(template, str) else None
