"""How a request reaches the API: the key it authenticates with (a FastAPI security dependency, so the
schema shows bearer auth), and the address it used, which our image links point back to."""

import functools
import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPBearer
from starlette.types import Scope

from qubax.api.bodies import UploadRoute
from qubax.errors import AuthenticationError
from qubax.records import api_keys, queries, tables
from qubax.server.services import Services


class ApiKeyAuth(HTTPBearer):
    """The bearer scheme, as a FastAPI security dependency that also checks the key: the schema shows
    bearer auth, and a request costs one dependency (each one costs FastAPI measurable work)."""

    async def __call__(self, request: Request) -> tables.KeyRecord:  # type: ignore[override]
        known: tables.KeyRecord | None = request.scope.get(KEY_SCOPE)  # authenticated before the body was read
        if known is not None:
            return known
        header = request.headers.get("authorization", "")
        token = api_keys.bearer_token(header)
        if not token and header.strip():
            raise AuthenticationError(
                "The Authorization header must read `Bearer YOUR_KEY`: what was sent is not a Bearer "
                "credential (is the `Bearer ` prefix missing?).",
                code="missing_api_key",
            )
        if not token:
            raise AuthenticationError(
                "You didn't provide an API key. You need to provide your API key in an Authorization header "
                "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                code="missing_api_key",
            )
        return await authenticate(request.app.state.services, token)


async def authenticate(services: Services, token: str) -> tables.KeyRecord:
    if not api_keys.looks_like_key(token):
        raise incorrect_key(token)
    digest = api_keys.digest_key(token)

    async def find() -> tables.KeyRecord | None:
        async with services.sessions() as session:
            row = await queries.find_key(session, digest)
            return None if row is None else tables.key_record(row)

    key = await services.keys.fetch(digest, find)
    # Found by its digest, so the stored digest is this one; compared again in constant time all the same.
    if key is None or not secrets.compare_digest(key.digest, digest):
        raise incorrect_key(token)
    if key.revoked_at is not None:
        raise AuthenticationError(f"The API key {api_keys.masked(token)} has been revoked.")
    return key


def incorrect_key(token: str) -> AuthenticationError:
    return AuthenticationError(f"Incorrect API key provided: {api_keys.masked(token)}.")


KEY_SCOPE = "qubax.key"
api_key = ApiKeyAuth(scheme_name="HTTPBearer", description="A Qubax API key, `qbx_live_…` or `qbx_test_…`.")
CurrentKey = Annotated[tables.KeyRecord, Depends(api_key)]


class AuthenticatedUploadRoute(UploadRoute):
    """An upload route whose key is checked from the headers, before the body is read: a request
    without a valid key is refused at once, and its upload never read."""

    async def admit(self, request: Request) -> None:
        request.scope[KEY_SCOPE] = await api_key(request)


def public_url(request: Request) -> str:
    """Where our image links point: the configured public address, or the one the client used."""
    services: Services = request.app.state.services
    return (services.settings.public_url or base_url(request.scope)).rstrip("/")


def base_url(scope: Scope) -> str:
    """Starlette's `request.base_url`, remembered for each host the clients name: working it out anew
    is measurably dearer (bench/README.md)."""
    host = next((value for name, value in scope["headers"] if name == b"host"), None)
    root_path = scope.get("app_root_path", scope.get("root_path", ""))
    server = scope.get("server")
    return known_base_url(scope.get("scheme", "http"), host, None if server is None else tuple(server), root_path)


@functools.lru_cache(maxsize=256)  # bounded: the Host header is the client's to choose
def known_base_url(scheme: str, host: bytes | None, server: tuple[str, int | None] | None, root_path: str) -> str:
    headers = [(b"host", host)] if host is not None else []
    scope = {"type": "http", "scheme": scheme, "server": server, "root_path": root_path, "headers": headers}
    return str(Request({**scope, "path": "/", "query_string": b""}).base_url)
