"""The API's documentation: OpenAPI schemas (the public one at `/openapi.json`, the admin API's behind
its token) and `/docs`, Swagger UI served from files shipped in a package, so it needs no internet."""

import importlib.resources
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from qubax import __version__

TITLE, VERSION = "Qubax Images", __version__
DESCRIPTION = (
    "OpenAI's Images API in front of FLUX, DALL-E and friends: point any OpenAI client at this server's "
    "`/v1` and use a Qubax API key. Errors always have OpenAI's shape."
)
DOCS_ASSETS = "/docs/assets"


def add_docs(app: FastAPI, public: APIRouter) -> None:
    """`/openapi.json` (the public API; the admin API's schema is at `/admin/openapi.json`, behind its
    token) and `/docs`, Swagger UI served from our own files."""

    def public_openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = openapi_schema(TITLE, DESCRIPTION, public, TAGS)
        return app.openapi_schema

    app.openapi = public_openapi  # type: ignore[method-assign]  # FastAPI's documented way to shape the schema
    assets = importlib.resources.files("fastapi_offline") / "static"
    app.mount(DOCS_ASSETS, StaticFiles(directory=str(assets)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}/openapi.json",
            title=f"{TITLE} API",
            swagger_js_url=f"{root}{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png",
        )


def openapi_schema(title: str, description: str, router: APIRouter, tags: list[dict[str, str]]) -> dict[str, Any]:
    """The schema of a router's routes, without the 422 FastAPI adds to each: invalid input is a 400
    with OpenAI's error object here, and each route lists it."""
    schema = get_openapi(title=title, version=VERSION, description=description, routes=router.routes, tags=tags)
    for operations in schema["paths"].values():
        for operation in operations.values():
            operation["responses"].pop("422", None)
    for name in ("HTTPValidationError", "ValidationError"):
        schema.get("components", {}).get("schemas", {}).pop(name, None)
    return schema


TAGS = [
    {"name": "Images", "description": "OpenAI's Images API."},
    {"name": "Jobs", "description": "Generations and edits sent with `Prefer: respond-async` (a Qubax extension)."},
    {"name": "Models", "description": "OpenAI's Models API."},
    {"name": "Operations", "description": "For load balancers and operators."},
]
