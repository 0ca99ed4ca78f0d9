"""What every console page shares: the router, its templates, and the headers that keep a page to
itself (a strict Content-Security-Policy: our own scripts, styles and images, nothing inline, no
frames)."""

import importlib.resources
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRouter
from fastapi.templating import Jinja2Templates

from qubax.api.bodies import LimitedRequest, LimitedRoute
from qubax.records import queries, tables

SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}
HERE = importlib.resources.files("qubax.console")
FORM_BYTES = 16 * 1024  # the largest body of a console form but the playground's (sign-in is open to all)


class FormRequest(LimitedRequest):
    @property
    def limit(self) -> int:
        return FORM_BYTES


class ConsoleRoute(LimitedRoute):
    """A console route: its body is at most a form's, its answers carry the security headers."""

    request_class: type[LimitedRequest] = FormRequest

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def handler(request: Request) -> Response:
            response = await handle(request)
            response.headers.update(SECURITY_HEADERS)
            return response

        return handler


router = APIRouter(prefix="/console", include_in_schema=False, route_class=ConsoleRoute)


def page(request: Request, template: str, console: tables.ConsoleSession | None, **context: Any) -> Response:
    """A page, with what its layout needs: where the console lives, and the CSRF token for its forms."""
    root = request.scope.get("root_path", "")
    csrf = console.csrf_token if console is not None else ""
    templates: Jinja2Templates = request.app.state.console_templates
    return templates.TemplateResponse(request, template, {"root": root, "csrf": csrf, **context})


def load_templates() -> Jinja2Templates:
    """The console's templates (HTML-escaped), with its filters."""
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["usd"] = usd
    return templates


def usd(micros: int) -> str:
    """Money as people read it: cents, or a fraction of a cent for very small amounts."""
    return f"${queries.to_usd(micros):,.2f}" if micros >= 10_000 or micros == 0 else f"${queries.to_usd(micros):.4f}"
