"""The admin token: whether the admin API is on at all, and the check every operator's way in makes
(the admin routes' dependency, the console's sign-in), wrong tokens counted against the address they
came from. Apart from the routes, so that the console checks a token as the admin API does without
importing the admin API's routes."""

import secrets

from fastapi import Request

from qubax.errors import AuthenticationError
from qubax.records import api_keys
from qubax.server.services import Services, ServicesDep
from qubax.server.settings import Settings, admin_token_problem


def enabled(settings: Settings) -> bool:
    """The admin API exists only when an admin token is set; an empty one would let anybody in, a short
    or repetitive one could be guessed (Settings refuses one at start, and so does `create_app`)."""
    token = settings.admin_token.get_secret_value() if settings.admin_token else ""
    return bool(token) and admin_token_problem(token) is None


async def authorize(request: Request, services: ServicesDep) -> None:
    """Only the admin token passes: API keys, valid or not, never reach an admin route. An address that
    sent wrong tokens too often is refused for a while, even with the right one."""
    client = request.client.host if request.client else ""
    if not await is_admin_token(services, api_keys.bearer_token(request.headers.get("authorization", "")), client):
        raise AuthenticationError(
            "This endpoint needs the admin token (QUBAX_ADMIN_TOKEN) in an Authorization header "
            "using Bearer auth; API keys are not accepted here."
        )


async def is_admin_token(services: Services, given: str, client: str) -> bool:
    """Whether `given` is the admin token. Wrong ones count against the address they came from, which
    is refused (429) for a while after too many, even with the right one."""
    await services.quotas.check_admin_failures(client)
    admin_token = services.settings.admin_token
    expected = admin_token.get_secret_value().encode() if admin_token else b""
    # Bytes: compare_digest refuses str with non-ASCII characters, which a header or a form may carry.
    if expected and secrets.compare_digest(given.encode(), expected):
        return True
    await services.quotas.count_admin_failure(client)
    return False
