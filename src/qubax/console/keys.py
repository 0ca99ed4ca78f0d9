"""Signing in and out, and the keys page: every key with its limits and this month's spend against its
budget; create one (its secret shown once), change its limits, revoke it (after a confirmation)."""

from datetime import UTC, datetime
from typing import Annotated

from fastapi import Form, Request, Response
from fastapi.responses import RedirectResponse
from starlette.datastructures import FormData

from qubax.api.admin_keys import find, not_found
from qubax.console import sessions
from qubax.console.sessions import ActionSession, PageSession
from qubax.console.web import page, router
from qubax.errors import AuthenticationError, Forbidden, InvalidRequest
from qubax.records import queries, tables
from qubax.server.services import Services, ServicesDep

LIMIT_FIELDS = {  # the form's fields, and what the form calls them
    "rpm": "Requests per minute",
    "images_per_day": "Images per day",
    "max_concurrent": "Concurrent requests",
    "monthly_budget_usd": "Monthly budget",
}


@router.get("/sign-in")
async def sign_in_page(request: Request) -> Response:
    return page(request, "sign_in.html", None, title="Sign in", failed=False)


@router.post("/sign-in")
async def sign_in(request: Request, services: ServicesDep, token: Annotated[str, Form()] = "") -> Response:
    if not sessions.same_origin(request):
        raise Forbidden("This request did not come from the console's own pages.", code="cross_origin")
    try:
        cookie = await sessions.sign_in(services, token, request.client.host if request.client else "")
    except AuthenticationError:
        answer = page(request, "sign_in.html", None, title="Sign in", failed=True)
        answer.status_code = 401
        return answer
    redirect = RedirectResponse(f"{request.scope.get('root_path', '')}/console", status_code=303)
    sessions.set_cookie(redirect, request, cookie)
    return redirect


@router.post("/sign-out")
async def sign_out(request: Request, console: ActionSession, services: ServicesDep) -> Response:
    await sessions.sign_out(services, console)
    redirect = RedirectResponse(f"{request.scope.get('root_path', '')}/console/sign-in", status_code=303)
    sessions.clear_cookie(redirect, request)
    return redirect


@router.get("/keys")
async def keys_page(request: Request, console: PageSession, services: ServicesDep) -> Response:
    return await show_keys(request, console, services)


async def show_keys(
    request: Request,
    console: tables.ConsoleSession,
    services: Services,
    created: tuple[tables.ApiKey, str] | None = None,
    error: str = "",
) -> Response:
    month = datetime.now(UTC).date().replace(day=1)
    async with services.sessions() as session:
        keys = await queries.list_keys(session)
        spent = {row.key_id: row.cost_micros for row in await queries.usage(session, ("key",), month)}
    answer = page(request, "keys.html", console, title="Keys", keys=keys, spent=spent, created=created, error=error)
    answer.status_code = 400 if error else 200
    return answer


@router.post("/keys")
async def create_key(
    request: Request,
    console: ActionSession,
    services: ServicesDep,
    name: Annotated[str, Form(max_length=200)] = "",
    kind: Annotated[str, Form()] = "test",
) -> Response:
    try:
        limits = limits_from(await request.form())
    except InvalidRequest as exc:
        return await show_keys(request, console, services, error=exc.message)
    async with services.sessions() as session:
        key, secret = await queries.create_key(session, name=name, test=kind != "live", limits=limits)
    return await show_keys(request, console, services, created=(key, secret))


@router.get("/keys/{key_id}")
async def key_page(key_id: str, request: Request, console: PageSession, services: ServicesDep) -> Response:
    return await show_key(request, console, services, key_id)


async def show_key(
    request: Request, console: tables.ConsoleSession, services: Services, key_id: str, error: str = ""
) -> Response:
    async with services.sessions() as session:
        key = await find(session, key_id)
    answer = page(request, "key.html", console, title=key.name or key.id, key=key, error=error)
    answer.status_code = 400 if error else 200
    return answer


@router.post("/keys/{key_id}/limits")
async def set_limits(key_id: str, request: Request, console: ActionSession, services: ServicesDep) -> Response:
    try:
        limits = limits_from(await request.form())
    except InvalidRequest as exc:
        return await show_key(request, console, services, key_id, error=exc.message)
    async with services.sessions() as session:
        key = await queries.update_limits(session, await find(session, key_id), limits)
    services.keys.forget(key.digest)
    return RedirectResponse(f"{request.scope.get('root_path', '')}/console/keys/{key.id}", status_code=303)


@router.post("/keys/{key_id}/revoke")
async def revoke(key_id: str, request: Request, console: ActionSession, services: ServicesDep) -> Response:
    async with services.sessions() as session:
        key = await queries.revoke_key(session, key_id=key_id)
    if key is None:
        raise not_found(key_id)
    services.keys.forget(key.digest)
    return RedirectResponse(f"{request.scope.get('root_path', '')}/console/keys", status_code=303)


def limits_from(form: FormData) -> dict[str, int | None]:
    """The limits a form sets: blank or 0 is none; the budget is in dollars."""
    options: dict[str, float | None] = {}
    for name, label in LIMIT_FIELDS.items():
        text = str(form.get(name) or "").strip()
        try:
            value = float(text) if text else None
        except ValueError:
            raise InvalidRequest(f"{label} must be a number; got {text!r}.", param=name) from None
        most = queries.MAX_BUDGET_USD if name.endswith("usd") else queries.MAX_LIMIT
        if value is not None and not 0 <= value <= most:
            raise InvalidRequest(f"{label} must be between 0 and {most:,.0f}.", param=name)
        options[name] = value if name.endswith("usd") or value is None else int(value)
    return queries.chosen_limits(options)
