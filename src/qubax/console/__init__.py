"""The operator console at `/console`: server-rendered pages (Jinja2 templates, charts drawn as SVG,
a few lines of script) for keys, usage, route health, jobs and a playground, served by the app itself
from files in this package. It exists only with `QUBAX_ADMIN_TOKEN` set, and signing in takes that
token (`sessions`)."""

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

from qubax.console import keys, overview, playground, usage
from qubax.console.sessions import SignInNeeded
from qubax.console.web import HERE, load_templates, router

PAGES = (keys, overview, playground, usage)  # each adds its routes to `router`


def add_console(app: FastAPI) -> None:
    app.state.console_templates = load_templates()
    app.mount("/console/static", StaticFiles(directory=str(HERE / "static")), name="console-static")
    app.include_router(router)
    app.add_exception_handler(SignInNeeded, to_sign_in)


async def to_sign_in(request: Request, exc: Exception) -> RedirectResponse:
    return RedirectResponse(f"{request.scope.get('root_path', '')}/console/sign-in", status_code=303)
