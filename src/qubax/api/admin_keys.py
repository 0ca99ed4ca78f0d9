"""The admin API's keys and their webhooks (`/admin/keys...`, `/admin/webhooks`): making, listing,
changing and revoking API keys, where their jobs report, and how those deliveries went.

A router of its own without prefix or guard: `admin.router` includes it, under `/admin` and behind the
admin token, where its routes keep their place in the admin API's schema."""

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter
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
from qubax.background import webhook_targets
from qubax.errors import InvalidRequest, NotFound
from qubax.records import queries, tables
from qubax.server.services import Services, ServicesDep

Limit = Annotated[StrictInt | None, Field(ge=0, le=queries.MAX_LIMIT)]
Budget = Annotated[float | None, Field(ge=0, le=queries.MAX_BUDGET_USD)]


# The answers below are read from the database's rows (`model_validate(row, from_attributes=True)`);
# these say how a stored value becomes what the API gives: times as OpenAI gives them, Unix seconds,
# and money in dollars (stored in micro-USD).
Seconds = Annotated[int, BeforeValidator(tables.unix)]
MaybeSeconds = Annotated[int | None, BeforeValidator(lambda moment: None if moment is None else tables.unix(moment))]
MaybeUsd = Annotated[float | None, BeforeValidator(lambda micros: None if micros is None else queries.to_usd(micros))]


router = APIRouter(route_class=LimitedRoute)


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
        return tables.unix(moment) if info.data.get("status") == "pending" else None


class DeliveryList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Delivery]


NO_BODY = NewKey()  # an empty body: a key with every default
NO_CHANGE = Limits()  # an empty body: no field set, nothing changes


@router.post("/keys", status_code=201)
async def create_key(services: ServicesDep, body: NewKey = NO_BODY) -> CreatedKey:
    limits = queries.chosen_limits(body.model_dump(include=set(Limits.model_fields)))
    async with services.sessions() as session:
        key, secret = await queries.create_key(session, name=body.name, test=body.test, limits=limits)
    # The secret is no column of the row: it joins the key's fields, read from the row just above.
    return CreatedKey.model_construct(**dict(describe(key)), key=secret)


@router.get("/keys")
async def list_keys(services: ServicesDep) -> KeyList:
    async with services.sessions() as session:
        return KeyList(data=[describe(key) for key in await queries.list_keys(session)])


@router.get("/keys/{key_id}")
async def retrieve_key(key_id: str, services: ServicesDep) -> Key:
    async with services.sessions() as session:
        return describe(await find(session, key_id))


@router.patch("/keys/{key_id}")
async def update_key(key_id: str, services: ServicesDep, body: Limits = NO_CHANGE) -> Key:
    async with services.sessions() as session:
        key = await find(session, key_id)
        key = await queries.update_limits(
            session, key, queries.chosen_limits(body.model_dump(include=body.model_fields_set))
        )
    return changed(key, services)


@router.post("/keys/{key_id}/revoke")
@router.delete("/keys/{key_id}")
async def revoke_key(key_id: str, services: ServicesDep) -> Key:
    async with services.sessions() as session:
        key = await queries.revoke_key(session, key_id=key_id)
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
    query = select(tables.WebhookDelivery).order_by(tables.WebhookDelivery.id.desc()).limit(limit)
    if status is not None:
        query = query.where(tables.WebhookDelivery.status == status)
    async with services.sessions() as session:
        found = list(await session.scalars(query))
    return DeliveryList(data=[Delivery.model_validate(row, from_attributes=True) for row in found])


async def find(session: AsyncSession, key_id: str) -> tables.ApiKey:
    key = await queries.find_key_by(session, key_id=key_id)
    if key is None:
        raise not_found(key_id)
    return key


def not_found(key_id: str) -> NotFound:
    return NotFound(f"No API key with id '{key_id}'.", param="key_id")


def changed(key: tables.ApiKey, services: Services) -> Key:
    # Other nodes see the change when their cached copy expires (within a second).
    services.keys.forget(key.digest)
    return describe(key)


def describe(key: tables.ApiKey) -> Key:
    return Key.model_validate(key, from_attributes=True)
