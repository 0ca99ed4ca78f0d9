"""The operators' endpoints, behind the admin token: the admin API (`/admin/...`: keys and their
webhooks from `admin_keys`, usage here) and Prometheus' `/metrics`.

`create_app` includes these routers only when `QUBAX_ADMIN_TOKEN` is set (`admin_token.enabled`);
without it they are 404s.
"""

from datetime import date
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, BeforeValidator, Field

from qubax.api import admin_keys
from qubax.api.admin_token import authorize
from qubax.api.bodies import LimitedRoute
from qubax.api.docs import openapi_schema
from qubax.errors import InvalidRequest, NotFound
from qubax.protocol import error_responses
from qubax.records import queries
from qubax.routing import lifecycle
from qubax.server.services import ServicesDep
from qubax.server.settings import ADMIN_TOKEN_CHARS

# Money in dollars (stored in micro-USD), as `admin_keys` reads its stored values.
Usd = Annotated[float, BeforeValidator(queries.to_usd)]


router = APIRouter(
    prefix="/admin",
    dependencies=[Depends(authorize)],
    route_class=LimitedRoute,
    responses=error_responses(400, 401, 404, 413, 429),
    tags=["Admin"],
)
metrics_router = APIRouter(dependencies=[Depends(authorize)], include_in_schema=False, route_class=LimitedRoute)
# Without an admin token these routes do not exist; they say how to turn them on instead of a bare 404.
off_router = APIRouter(include_in_schema=False, route_class=LimitedRoute)


@off_router.api_route("/metrics", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
@off_router.api_route("/admin/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
@off_router.api_route("/console", methods=["GET", "POST"])
@off_router.api_route("/console/{path:path}", methods=["GET", "POST"])
async def switched_off() -> None:
    raise NotFound(
        "The admin API, the console and /metrics are off on this server: the operator turns them on by setting "
        f"QUBAX_ADMIN_TOKEN (at least {ADMIN_TOKEN_CHARS} characters, e.g. `openssl rand -hex 32`)."
    )


@router.get("/openapi.json", include_in_schema=False)
async def admin_openapi() -> dict[str, Any]:
    """The admin API's own schema, for holders of the admin token only (the public one leaves it out)."""
    return openapi_schema(
        "Qubax Images admin API", "Keys, their webhooks, webhook deliveries and usage, for operators.", router, []
    )


@metrics_router.get("/metrics")
async def serve_metrics(services: ServicesDep) -> Response:
    """Prometheus' scrape target (`authorization: {type: Bearer, ...}` in the scrape job)."""
    await services.metrics.read_jobs(services.sessions)
    services.metrics.shutdowns = lifecycle.shutdowns(services.catalog.models, services.published)
    return Response(services.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


# Between the schema's route and usage's: the admin schema lists the routes in this order.
router.include_router(admin_keys.router)


class Usage(BaseModel):
    object: Literal["usage"] = "usage"
    key_id: str | None = None
    key_name: str | None = None
    model: str | None = None
    day: date | None = None
    requests: int
    images: int
    cost_usd: Usd = Field(validation_alias="cost_micros")


class UsageList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Usage]


@router.get("/usage", response_model_exclude_none=True)
async def usage(services: ServicesDep, group_by: str = "key,model", since: str = "", until: str = "") -> UsageList:
    groups = [group.strip() for group in group_by.split(",") if group.strip()]
    unknown = [group for group in groups if group not in queries.USAGE_GROUPS]
    if unknown:
        choices = ", ".join(queries.USAGE_GROUPS)
        raise InvalidRequest(f"Invalid value for 'group_by': {unknown[0]!r} is not one of {choices}.", param="group_by")
    first, last = parse_day(since, "since"), parse_day(until, "until")
    check_order(first, last)
    async with services.sessions() as session:
        rows = await queries.usage(session, list(dict.fromkeys(groups)), first, last)
    return UsageList(data=[Usage.model_validate(row, from_attributes=True) for row in rows])


# Usage is stamped in Unix time, so nothing is older than 1970; and a range ends before the next day
# begins, which must exist (9999-12-31 has none: an OverflowError).
FIRST_DAY, LAST_DAY = date(1970, 1, 1), date(9999, 12, 30)


def parse_day(text: str, param: str) -> date | None:
    """A usage query's `since` or `until` (the admin API's and the console's), or a 400 naming it."""
    if not text:
        return None
    try:
        day = date.fromisoformat(text)
    except ValueError:
        day = None
    if day is None or not FIRST_DAY <= day <= LAST_DAY:
        raise InvalidRequest(
            f"Invalid value for '{param}': expected a day from {FIRST_DAY} to {LAST_DAY}. Days are written YYYY-MM-DD.",
            param=param,
        )
    return day


def check_order(first: date | None, last: date | None) -> None:
    if first and last and first > last:
        raise InvalidRequest("Invalid value for 'since': it is after 'until'.", param="since")
