"""Who may use the console: an operator who signed in with the admin token, and holds the session cookie
that got them. Sessions live in the database (any node knows them) and expire; the cookie carries a
random token, stored only as its digest. Every request that changes anything carries the session's
CSRF token and comes from the console's own origin."""

import secrets
from datetime import timedelta
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import Depends, Request, Response
from sqlalchemy import delete

from qubax.api.admin_token import is_admin_token
from qubax.errors import AuthenticationError, Forbidden
from qubax.records import tables
from qubax.records.api_keys import digest_key
from qubax.server.services import Services

COOKIE = "qubax_console"
LIFETIME = timedelta(hours=8)
PATH = "/console"


class SignInNeeded(Exception):
    """A page asked for without a session: answered with the way to the sign-in page."""


async def sign_in(services: Services, given: str, client: str) -> str:
    """A new session's cookie token, for the admin token; a refusal that says nothing more otherwise.
    Wrong tokens count against the address as for the admin API."""
    if not await is_admin_token(services, given, client):
        raise AuthenticationError("Sign-in failed.")
    token = secrets.token_urlsafe(32)
    now = tables.now()
    async with services.sessions() as session:
        await session.execute(delete(tables.ConsoleSession).where(tables.ConsoleSession.expires_at < now))
        session.add(
            tables.ConsoleSession(
                digest=digest_key(token),
                csrf_token=secrets.token_urlsafe(32),
                created_at=now,
                expires_at=now + LIFETIME,
            )
        )
        await session.commit()
    return token


async def sign_out(services: Services, console: tables.ConsoleSession) -> None:
    async with services.sessions() as session:
        await session.execute(delete(tables.ConsoleSession).where(tables.ConsoleSession.digest == console.digest))
        await session.commit()


def set_cookie(response: Response, request: Request, token: str) -> None:
    response.set_cookie(
        COOKIE,
        token,
        max_age=int(LIFETIME.total_seconds()),
        path=PATH,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def clear_cookie(response: Response, request: Request) -> None:
    response.delete_cookie(COOKIE, path=PATH, httponly=True, samesite="strict", secure=request.url.scheme == "https")


async def find(request: Request) -> tables.ConsoleSession | None:
    token = request.cookies.get(COOKIE)
    if not token:
        return None
    services: Services = request.app.state.services
    async with services.sessions() as session:
        found = await session.get(tables.ConsoleSession, digest_key(token))
    if found is None or tables.utc(found.expires_at) < tables.now():
        return None
    return found


async def page_session(request: Request) -> tables.ConsoleSession:
    """For pages: the session, or the way to the sign-in page."""
    found = await find(request)
    if found is None:
        raise SignInNeeded()
    return found


async def signed_in(request: Request) -> tables.ConsoleSession:
    """For requests that change something, what their head alone shows (so an upload is read only
    after it): the session, from our own origin."""
    if not same_origin(request):
        raise Forbidden("This request did not come from the console's own pages.", code="cross_origin")
    found = await find(request)
    if found is None:
        raise AuthenticationError("Sign in to the console first.", code="no_session")
    return found


async def action_session(request: Request) -> tables.ConsoleSession:
    """For requests that change something: the session, from our own origin, with its CSRF token."""
    found = await signed_in(request)
    form = await request.form()  # parsed once: the route's own Form fields read the same
    sent = request.headers.get("x-csrf-token") or str(form.get("csrf_token") or "")
    if not secrets.compare_digest(sent.encode(), found.csrf_token.encode()):
        raise Forbidden("The form is stale or forged (its CSRF token does not match): reload the page.", code="csrf")
    return found


def same_origin(request: Request) -> bool:
    """Whether a state-changing request names our own origin (browsers send `Origin` with every POST)."""
    origin = request.headers.get("origin") or request.headers.get("referer")
    if not origin:
        return False
    parts = urlsplit(origin)
    return f"{parts.scheme}://{parts.netloc}" == f"{request.url.scheme}://{request.url.netloc}"


PageSession = Annotated[tables.ConsoleSession, Depends(page_session)]
ActionSession = Annotated[tables.ConsoleSession, Depends(action_session)]
