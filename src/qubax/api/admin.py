"""The operators' endpoints, behind the admin token: the admin API (`/admin/...`: keys, their webhooks,
webhook deliveries and usage)
and Prometheus' `/metrics`.

`create_app` includes these routers only when `QUBAX_ADMIN_TOKEN` is set; without it they are 404s.
"""

import secrets
from datetime import date, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationInfo,
    field_validator,
)
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from qubax.api.bodies import LimitedRoute
from qubax.api.docs import openapi_schema
from qubax.background import webhook_targets
from qubax.errors import AuthenticationError, InvalidRequest, NotFound
from qubax.protocol import error_responses
from qubax.records import api_keys, db
from qubax.server.services import Services, ServicesDep
from qubax.server.settings import ADMIN_TOKEN_CHARS, Settings, admin_token_problem

Limit = Annotated[StrictInt | None, Field(ge=0, le=db.MAX_LIMIT)]
Budget = Annotated[float | None, Field(ge=0, le=db.MAX_BUDGET_USD)]


# The answers below are read from the database's rows (`model_validate(row, from_attributes=True)`);
# these say how a stored value becomes what the API gives: times as OpenAI gives them, Unix seconds,
# and money in dollars (stored in micro-USD).
Seconds = Annotated[int, BeforeValidator(db.unix)]
MaybeSeconds = Annotated[int | None, BeforeValidator(lambda moment: None if moment is None else db.unix(moment))]
Usd = Annotated[float, BeforeValidator(db.to_usd)]
MaybeUsd = Annotated[float | None, BeforeValidator(lambda micros: None if micros is None else db.to_usd(micros))]


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
    return Response(services.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


class Limits(BaseModel):
    """A key's limits; 0 or null is no limit."""

    model_config = ConfigDict(extra="forbid", strict=True)

    rpm: Limit = None
    images_per_day: Limit = None
    max_concurrent: Limit = None
    monthly_budget_usd: Budget = None


class NewKey(Limits):
    name: StrictStr = Field(default="", max_length=200)
    test: StrictBool = False


class Key(BaseModel):
    object: Literal["api_key"] = "api_key"
    id: str
    name: str
    prefix: str
    test: bool
    created_at: Seconds
    revoked_at: MaybeSeconds
    rpm: int | None
    images_per_day: int | None
    max_concurrent: int | None
    monthly_budget_usd: MaybeUsd = Field(validation_alias="monthly_budget_micros")


class CreatedKey(Key):
    key: str  # the secret: in this response only, never stored


class KeyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Key]


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


class WebhookSettings(BaseModel):
    """A key's webhooks: its default target (null for none; jobs may name their own) and whether to make
    a new signing secret. A key's first target makes its first secret."""

    model_config = ConfigDict(extra="forbid", strict=True)

    url: StrictStr | None = None
    rotate_secret: StrictBool = False


class KeyWebhooks(BaseModel):
    object: Literal["webhook_settings"] = "webhook_settings"
    key_id: str
    url: str | None
    has_secret: bool
    secret: str | None = Field(description="The signing secret, in the answer that made it only.")


class Delivery(BaseModel):
    object: Literal["webhook_delivery"] = "webhook_delivery"
    id: str  # the `webhook-id` header
    job_id: str
    key_id: str
    url: str
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    last_status: int | None
    last_error: str | None
    created_at: Seconds
    next_attempt_at: int | None  # while pending
    delivered_at: MaybeSeconds

    @field_validator("next_attempt_at", mode="before")
    @classmethod
    def while_pending(cls, moment: datetime, info: ValidationInfo) -> int | None:
        return db.unix(moment) if info.data.get("status") == "pending" else None


class DeliveryList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Delivery]


NO_BODY = NewKey()  # an empty body: a key with every default
NO_CHANGE = Limits()  # an empty body: no field set, nothing changes


@router.post("/keys", status_code=201)
async def create_key(services: ServicesDep, body: NewKey = NO_BODY) -> CreatedKey:
    limits = db.chosen_limits(body.model_dump(include=set(Limits.model_fields)))
    async with services.sessions() as session:
        key, secret = await db.create_key(session, name=body.name, test=body.test, limits=limits)
    # The secret is no column of the row: it joins the key's fields, read from the row just above.
    return CreatedKey.model_construct(**dict(describe(key)), key=secret)


@router.get("/keys")
async def list_keys(services: ServicesDep) -> KeyList:
    async with services.sessions() as session:
        return KeyList(data=[describe(key) for key in await db.list_keys(session)])


@router.get("/keys/{key_id}")
async def retrieve_key(key_id: str, services: ServicesDep) -> Key:
    async with services.sessions() as session:
        return describe(await find(session, key_id))


@router.patch("/keys/{key_id}")
async def update_key(key_id: str, services: ServicesDep, body: Limits = NO_CHANGE) -> Key:
    async with services.sessions() as session:
        key = await find(session, key_id)
        key = await db.update_limits(session, key, db.chosen_limits(body.model_dump(include=body.model_fields_set)))
    return changed(key, services)


@router.post("/keys/{key_id}/revoke")
@router.delete("/keys/{key_id}")
async def revoke_key(key_id: str, services: ServicesDep) -> Key:
    async with services.sessions() as session:
        key = await db.revoke_key(session, key_id=key_id)
    if key is None:
        raise not_found(key_id)
    return changed(key, services)


@router.put("/keys/{key_id}/webhook")
async def set_webhooks(key_id: str, body: WebhookSettings, services: ServicesDep) -> KeyWebhooks:
    """Where the key's jobs report by default, and its signing secret (shown here once, when made)."""
    if body.url is not None:
        await webhook_targets.check_target(body.url, services.settings.webhook_allowed_hosts)
    async with services.sessions() as session:
        key = await find(session, key_id)
        secret = webhook_targets.configure(key, body.url, body.rotate_secret)
        await session.commit()
    return KeyWebhooks(key_id=key.id, url=key.webhook_url, has_secret=key.webhook_secret is not None, secret=secret)


@router.get("/webhooks")
async def list_deliveries(services: ServicesDep, limit: int = 50, status: str | None = None) -> DeliveryList:
    """The newest webhook deliveries first, and how each went."""
    if not 1 <= limit <= 1000:
        raise InvalidRequest(f"limit must be between 1 and 1000; got {limit}.", param="limit")
    query = select(db.WebhookDelivery).order_by(db.WebhookDelivery.id.desc()).limit(limit)
    if status is not None:
        query = query.where(db.WebhookDelivery.status == status)
    async with services.sessions() as session:
        found = list(await session.scalars(query))
    return DeliveryList(data=[Delivery.model_validate(row, from_attributes=True) for row in found])


@router.get("/usage", response_model_exclude_none=True)
async def usage(services: ServicesDep, group_by: str = "key,model", since: str = "", until: str = "") -> UsageList:
    groups = [group.strip() for group in group_by.split(",") if group.strip()]
    unknown = [group for group in groups if group not in db.USAGE_GROUPS]
    if unknown:
        choices = ", ".join(db.USAGE_GROUPS)
        raise InvalidRequest(f"Invalid value for 'group_by': {unknown[0]!r} is not one of {choices}.", param="group_by")
    first, last = parse_day(since, "since"), parse_day(until, "until")
    check_order(first, last)
    async with services.sessions() as session:
        rows = await db.usage(session, list(dict.fromkeys(groups)), first, last)
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


async def find(session: AsyncSession, key_id: str) -> db.ApiKey:
    key = await db.find_key_by(session, key_id=key_id)
    if key is None:
        raise not_found(key_id)
    return key


def not_found(key_id: str) -> NotFound:
    return NotFound(f"No API key with id '{key_id}'.", param="key_id")


def changed(key: db.ApiKey, services: Services) -> Key:
    # Other nodes see the change when their cached copy expires (within a second).
    services.keys.forget(key.digest)
    return describe(key)


def describe(key: db.ApiKey) -> Key:
    return Key.model_validate(key, from_attributes=True)
