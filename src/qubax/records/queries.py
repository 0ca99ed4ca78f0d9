"""The queries on the tables that several modules share: API keys and their limits as stored (budgets in
micro-USD), what a key has been charged, the job queue's counts and clean-up, and usage reports. The admin
API, the CLI, the console and the quota all ask the same questions, and get the same answers here."""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import Date, Select, case, cast, delete, func, literal_column, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnElement, Label

from qubax.records import api_keys
from qubax.records.tables import ApiKey, Generation, ImageJob, JobInput, WebhookDelivery, now

LIMITS = ("rpm", "images_per_day", "max_concurrent", "monthly_budget_micros")
MAX_LIMIT = 2**31 - 1  # the count limits are 32-bit integers on PostgreSQL
MICROS_PER_USD = 1_000_000
MAX_BUDGET_USD = 1_000_000_000.0  # far inside the 64-bit budget column, and exact in a float


def to_micros(usd: float) -> int:
    return round(usd * MICROS_PER_USD)


def to_usd(micros: int) -> float:
    return micros / MICROS_PER_USD


def chosen_limits(options: Mapping[str, Any]) -> dict[str, int | None]:
    """The limits named in `options` (the budget as `monthly_budget_usd`), as stored: budgets in
    micro-USD, and 0 or None for no limit. Limits not named are left out, so they stay as they are."""
    chosen = {name: options[name] for name in LIMITS if name in options}
    if "monthly_budget_usd" in options:
        budget = options["monthly_budget_usd"]
        # A positive budget never rounds to 0, which would mean no limit: the least is one micro-USD.
        chosen["monthly_budget_micros"] = None if budget is None else max(to_micros(budget), 1 if budget > 0 else 0)
    return {name: value or None for name, value in chosen.items()}


async def create_key(
    session: AsyncSession, *, name: str, test: bool, limits: dict[str, int | None] | None = None
) -> tuple[ApiKey, str]:
    """A new key with its limits, stored; returns it with its secret, which exists only until shown."""
    new = api_keys.new_key(test=test)
    key = await add_key(session, name=name, prefix=new.prefix, digest=new.digest, test=test, limits=limits)
    return key, new.secret


async def add_key(
    session: AsyncSession,
    *,
    name: str,
    prefix: str,
    digest: str,
    test: bool,
    limits: dict[str, int | None] | None = None,
) -> ApiKey:
    key = ApiKey(name=name, prefix=prefix, digest=digest, test=test, **(limits or {}))
    session.add(key)
    await session.commit()
    return key


async def find_key(session: AsyncSession, digest: str) -> ApiKey | None:
    return await session.scalar(select(ApiKey).where(ApiKey.digest == digest))


async def list_keys(session: AsyncSession) -> list[ApiKey]:
    return list(await session.scalars(select(ApiKey).order_by(ApiKey.created_at)))


async def revoke_key(session: AsyncSession, *, key_id: str | None = None, digest: str | None = None) -> ApiKey | None:
    """Revoke by id or by digest of the full key; returns the key, or None when there is no such key."""
    key = await find_key_by(session, key_id=key_id, digest=digest)
    if key is not None and key.revoked_at is None:
        key.revoked_at = now()
        await session.commit()
    return key


async def find_key_by(session: AsyncSession, *, key_id: str | None = None, digest: str | None = None) -> ApiKey | None:
    where = ApiKey.id == key_id if key_id is not None else ApiKey.digest == digest
    return await session.scalar(select(ApiKey).where(where))


async def update_limits(session: AsyncSession, key: ApiKey, limits: dict[str, int | None]) -> ApiKey:
    for name, value in limits.items():
        setattr(key, name, value)
    await session.commit()
    return key


async def charged(session: AsyncSession, key_id: str, day: datetime, month: datetime) -> tuple[int, int]:
    """The images a key has been charged for since `day`, and their cost in micro-USD since `month`
    (which is not after `day`), with what its pending jobs hold of each, in one query."""
    images_today = case((Generation.created_at >= day, Generation.images), else_=0)
    # Jobs not yet ended hold what they may still cost: a burst of them cannot overspend.
    pending = (ImageJob.key_id == key_id) & ImageJob.status.in_(PENDING)
    held_images = select(func.coalesce(func.sum(ImageJob.reserved_images), 0)).where(pending).scalar_subquery()
    held_micros = select(func.coalesce(func.sum(ImageJob.reserved_micros), 0)).where(pending).scalar_subquery()
    query = select(
        func.coalesce(func.sum(images_today), 0),
        func.coalesce(func.sum(Generation.cost_micros), 0),
        held_images,
        held_micros,
    )
    row = (await session.execute(query.where(Generation.key_id == key_id, Generation.created_at >= month))).one()
    return int(row[0]) + int(row[2]), int(row[1]) + int(row[3])


PENDING = ("queued", "in_progress")  # a job's statuses before it ends


def ended_jobs(ended_before: datetime) -> Select[str]:
    """The ids of the jobs that ended before a time."""
    return select(ImageJob.id).where(ImageJob.status.not_in(PENDING), ImageJob.completed_at < ended_before)


async def count_jobs(session: AsyncSession) -> dict[str, int]:
    """How many jobs wait in the queue and how many are being made, of every node."""
    query = select(ImageJob.status, func.count()).where(ImageJob.status.in_(PENDING)).group_by(ImageJob.status)
    found = {status: int(count) for status, count in await session.execute(query)}
    return {status: found.get(status, 0) for status in PENDING}


async def forget_jobs(session: AsyncSession, ended_before: datetime) -> int:
    """Delete the jobs that ended before a time, with their webhook deliveries; returns how many."""
    old = ended_jobs(ended_before)
    await session.execute(delete(WebhookDelivery).where(WebhookDelivery.job_id.in_(old)))
    await session.execute(delete(JobInput).where(JobInput.job_id.in_(old)))
    result = await session.execute(delete(ImageJob).where(ImageJob.id.in_(old)))
    await session.commit()
    return int(result.rowcount)  # type: ignore[attr-defined]


USAGE_GROUPS = ("key", "model", "day")


@dataclass(frozen=True)
class UsageRow:
    requests: int
    images: int
    cost_micros: int
    errors: int = 0  # requests that did not end ok
    # Set only when grouped by them.
    key_id: str | None = None
    key_name: str | None = None
    model: str | None = None
    day: date | None = None


async def usage(
    session: AsyncSession,
    group_by: Sequence[str] = ("key", "model"),
    since: date | None = None,
    until: date | None = None,
    *,
    key_id: str | None = None,
    model: str | None = None,
) -> list[UsageRow]:
    """Requests, images, cost and failed requests per group (any of `USAGE_GROUPS`, ordered as given)
    over the generations from day `since` through day `until` (UTC, both included), of one key or one
    model when given."""
    columns: list[Label[Any]] = []
    for group in group_by:
        if group == "key":
            columns += [Generation.key_id.label("key_id"), ApiKey.name.label("key_name")]
        elif group == "model":
            columns.append(Generation.model.label("model"))
        elif group == "day":
            columns.append(utc_day(session).label("day"))
        else:
            raise ValueError(f"usage cannot be grouped by {group!r}")
    query = select(
        func.count().label("requests"),
        func.coalesce(func.sum(Generation.images), 0).label("images"),
        func.coalesce(func.sum(Generation.cost_micros), 0).label("cost_micros"),
        func.coalesce(func.sum(case((Generation.outcome != "ok", 1), else_=0)), 0).label("errors"),
        *columns,
    )
    if key_id is not None:
        query = query.where(Generation.key_id == key_id)
    if model is not None:
        query = query.where(Generation.model == model)
    if "key" in group_by:
        query = query.join(ApiKey, ApiKey.id == Generation.key_id)
    if since is not None:
        query = query.where(Generation.created_at >= datetime.combine(since, time(), UTC))
    if until is not None:
        query = query.where(Generation.created_at < datetime.combine(until + timedelta(days=1), time(), UTC))
    query = query.group_by(*columns).order_by(*columns)
    # PostgreSQL sums big integers as numerics (Decimal): the counts are whole numbers, made ints here.
    counts = ("requests", "images", "cost_micros", "errors")
    return [
        UsageRow(**{**row, **{name: int(row[name]) for name in counts}})
        for row in (await session.execute(query)).mappings()
    ]


def utc_day(session: AsyncSession) -> ColumnElement[date]:
    """The UTC day a generation was recorded on, as a date."""
    if session.get_bind().dialect.name == "postgresql":
        # A timestamptz becomes a date in the session's time zone, which need not be UTC. The zone is
        # literal SQL: as a bound parameter, GROUP BY would not see the same expression as SELECT.
        return cast(func.timezone(literal_column("'UTC'"), Generation.created_at), Date)
    return func.date(Generation.created_at, type_=Date)  # SQLite keeps the UTC time as text
