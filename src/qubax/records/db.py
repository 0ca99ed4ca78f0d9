"""The database: its tables (API keys, the usage ledger, idempotent requests, jobs) and the handful of
queries we run on them that several modules share."""

import os
import secrets
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from time import time_ns
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Date,
    DateTime,
    ForeignKey,
    Integer,
    LargeBinary,
    Select,
    String,
    Text,
    case,
    cast,
    delete,
    event,
    func,
    literal_column,
    select,
)
from sqlalchemy.engine import Connection, Dialect, ExceptionContext
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.elements import ColumnElement, Label

from qubax.errors import DatabaseUnavailable
from qubax.records import api_keys, sqlite_writer


class Base(DeclarativeBase):
    pass


def now() -> datetime:
    return datetime.now(UTC)


def utc(moment: datetime) -> datetime:
    """A time read back from the database, with its zone: SQLite hands back the UTC time it stored
    without one."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def unix(moment: datetime) -> int:
    """A stored time as the API gives times: Unix seconds."""
    return int(utc(moment).timestamp())


def new_id(prefix: str) -> str:
    """A unique id that sorts by creation time (microseconds, then 40 random bits): new rows land at the
    end of the primary-key index instead of on a random page of it. With random ids, a batch of usage
    records dirtied a page per row once the table outgrew memory's view of it (bench/README.md)."""
    return f"{prefix}_{time_ns() // 1000:013x}{secrets.token_hex(5)}"


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("key"))
    name: Mapped[str] = mapped_column(String(200), default="")
    prefix: Mapped[str] = mapped_column(String(32))  # shown in listings; too short to authenticate
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    test: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    # Limits; None means unlimited.
    rpm: Mapped[int | None] = mapped_column(Integer, default=None)
    images_per_day: Mapped[int | None] = mapped_column(Integer, default=None)
    max_concurrent: Mapped[int | None] = mapped_column(Integer, default=None)
    monthly_budget_micros: Mapped[int | None] = mapped_column(BigInteger, default=None)
    # Webhooks: where the key's jobs report when they name no target, and the secret that signs them
    # (Standard Webhooks' `whsec_…`; kept, as a signer must, and shown only when made).
    webhook_url: Mapped[str | None] = mapped_column(Text, default=None)
    webhook_secret: Mapped[str | None] = mapped_column(String(64), default=None)


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """An API key as requests see it: a plain copy of its row. Requests read a key many times, and reads
    through SQLAlchemy's instrumented attributes are measurably dearer on the hot path (bench/README.md)."""

    id: str
    digest: str
    test: bool
    revoked_at: datetime | None
    rpm: int | None
    images_per_day: int | None
    max_concurrent: int | None
    monthly_budget_micros: int | None


def key_record(key: ApiKey) -> KeyRecord:
    return KeyRecord(
        key.id, key.digest, key.test, key.revoked_at, key.rpm, key.images_per_day, key.max_concurrent,
        key.monthly_budget_micros,
    )  # fmt: skip


class Generation(Base):
    __tablename__ = "generations"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("gen"))
    key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), index=True)
    model: Mapped[str] = mapped_column(String(100))
    upstream: Mapped[str] = mapped_column(String(50))  # the route(s) that delivered, e.g. "bfl" or "bfl+fal"
    n: Mapped[int] = mapped_column(Integer)
    size: Mapped[str] = mapped_column(String(20))
    images: Mapped[int] = mapped_column(Integer, default=0)  # images delivered, and so charged
    cost_micros: Mapped[int] = mapped_column(BigInteger, default=0)  # millionths of a US dollar
    latency_ms: Mapped[int] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(String(50))  # "ok" or the error code we answered with
    error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now, index=True)


class Attempt(Base):
    """One try of one route within a generation; failover makes several."""

    __tablename__ = "attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    generation_id: Mapped[str] = mapped_column(ForeignKey("generations.id"), index=True)
    upstream: Mapped[str] = mapped_column(String(50))
    upstream_model: Mapped[str] = mapped_column(String(200))
    n: Mapped[int] = mapped_column(Integer)
    images: Mapped[int] = mapped_column(Integer)
    latency_ms: Mapped[int] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(String(50))
    error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class IdempotentRequest(Base):
    """A request sent with an `Idempotency-Key`: what it was (a digest), whether it is still at work,
    and once it succeeded, its answer, replayed to the same request sent again."""

    __tablename__ = "idempotent_requests"

    key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(String(255), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))  # "running" or "done"
    response_status: Mapped[int | None] = mapped_column(Integer, default=None)
    response_headers: Mapped[str | None] = mapped_column(Text, default=None)  # JSON
    response_body: Mapped[bytes | None] = mapped_column(LargeBinary, default=None)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)  # its worker is alive
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class ImageJob(Base):
    """A generation or edit asked for with `Prefer: respond-async`: queued here, run by any node, kept
    with its outcome for its key to read."""

    __tablename__ = "image_jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # sorts by creation: lists page by it
    key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), index=True)
    endpoint: Mapped[str] = mapped_column(String(64))  # the path it was sent to
    model: Mapped[str] = mapped_column(String(100))
    fields: Mapped[str] = mapped_column(Text)  # JSON: the request's fields (an edit's files are job_inputs)
    public_url: Mapped[str] = mapped_column(Text)  # where its image links point
    status: Mapped[str] = mapped_column(String(16), index=True)  # queued, in_progress, succeeded, failed, cancelled
    # What it holds of the key's daily images and monthly budget until it ends (then the ledger has it).
    reserved_images: Mapped[int] = mapped_column(Integer)
    reserved_micros: Mapped[int] = mapped_column(BigInteger)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    result: Mapped[bytes | None] = mapped_column(LargeBinary, default=None)  # the ImagesResponse, JSON
    error: Mapped[str | None] = mapped_column(Text, default=None)  # the OpenAI error object, JSON
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)  # its runner lives
    webhook_url: Mapped[str | None] = mapped_column(Text, default=None)  # told when the job ends


class JobInput(Base):
    """A file of an edit job (an image or the mask), kept in the image storage until the job ends."""

    __tablename__ = "job_inputs"

    job_id: Mapped[str] = mapped_column(ForeignKey("image_jobs.id"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    field: Mapped[str] = mapped_column(String(16))  # "image" or "mask"
    filename: Mapped[str] = mapped_column(String(255))
    stored: Mapped[str] = mapped_column(String(128))  # its name in the image storage (`Storage.put_file`)


class UpstreamTask(Base):
    """Work an upstream accepted for a job or an idempotent request (its task id, its URLs), written
    before anyone waits on it: if the node waiting dies, the node that takes over waits on the same task
    instead of paying for a new one."""

    __tablename__ = "upstream_tasks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    owner: Mapped[str] = mapped_column(String(80), index=True)  # "job:<id>" or "idem:<digest>"
    provider: Mapped[str] = mapped_column(String(50))
    upstream_model: Mapped[str] = mapped_column(String(200))
    images: Mapped[int] = mapped_column(Integer)  # how many the task makes
    handle: Mapped[str] = mapped_column(Text)  # JSON, as the adapter wrote it
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now, index=True)


class WebhookDelivery(Base):
    """A job's end, to be told to its webhook: tried until its target answers 2xx, or the retries run out."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # `webhook-id`: the same on every try
    job_id: Mapped[str] = mapped_column(ForeignKey("image_jobs.id"))
    key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    url: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))  # pending, delivered or failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_status: Mapped[int | None] = mapped_column(Integer, default=None)  # the target's HTTP status
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)


class ConsoleSession(Base):
    """A signed-in operator console: the cookie's token is known by its digest only."""

    __tablename__ = "console_sessions"

    digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    csrf_token: Mapped[str] = mapped_column(String(64))  # sent back by every form that changes anything
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


def connect(url: str) -> AsyncEngine:
    if not url.startswith("sqlite"):
        # A server that stops answering (frozen, or a host gone from the network) must not hold requests
        # for asyncpg's 60 s connect default, or for ever mid-statement: every statement here is a small
        # indexed one or a batch of inserts.
        engine = create_async_engine(
            url, connect_args={"timeout": CONNECT_SECONDS, "command_timeout": STATEMENT_SECONDS}
        )
        event.listen(engine.sync_engine, "do_connect", connect_or_fail)
        event.listen(engine.sync_engine, "handle_error", unavailable)
        return engine
    path = url.split(":///", 1)[-1]
    if path and path != ":memory:":
        # Keys' digests and everyone's usage: readable by the service's user only. SQLite gives its
        # -wal and -shm files the database file's permissions.
        Path(path).parent.mkdir(mode=PRIVATE_FOLDER, parents=True, exist_ok=True)
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, PRIVATE_FILE))
    engine = create_async_engine(url)
    event.listen(engine.sync_engine, "connect", tune_sqlite)
    event.listen(engine.sync_engine, "handle_error", unavailable)
    return engine


CONNECT_SECONDS, STATEMENT_SECONDS = 5.0, 15.0

# PostgreSQL's SQLSTATE classes for a failing server rather than a failing statement: the connection
# (08), resources such as the disk or connection slots (53), a shutdown or start under way (57P).
POSTGRESQL_FAILURES = ("08", "53", "57P")
SQLITE_FAILURES = {sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_BUSY, sqlite3.SQLITE_CANTOPEN}


def connect_or_fail(dialect: Dialect, record: Any, args: Any, options: Any) -> Any:
    """A new connection, made as SQLAlchemy would; the driver's network errors (refused, timed out),
    which SQLAlchemy hands on untouched and without calling `unavailable`, become ours too."""
    try:
        return dialect.connect(*args, **options)
    except OSError as exc:  # TimeoutError included
        raise DatabaseUnavailable(UNAVAILABLE) from exc


UNAVAILABLE = "The database is unavailable, so the server could not complete the request; try again shortly."


def unavailable(context: ExceptionContext) -> None:
    """SQLAlchemy's hook for every database error, on any session or connection: a database that cannot
    be reached or written becomes ours, a 503 that says when to come back, instead of a crash (500)."""
    error = context.original_exception
    if not isinstance(error, Exception):
        # A cancellation (a node stopping, a client gone) reaches this hook as a "disconnect": made ours,
        # it would be caught as a database that is away, and the cancelled work would go on.
        return
    state = getattr(error, "sqlstate", None)
    failing = (
        context.is_disconnect
        or isinstance(error, OSError)
        or (isinstance(state, str) and state.startswith(POSTGRESQL_FAILURES))
        or getattr(error, "sqlite_errorcode", 0) & 0xFF in SQLITE_FAILURES  # the primary code of an extended one
    )
    if failing:
        raise DatabaseUnavailable(UNAVAILABLE) from error


def tune_sqlite(connection: Any, record: Any) -> None:
    """The same settings as the ledger's helper process (`sqlite_writer.PRAGMAS` says why)."""
    cursor = connection.cursor()
    for pragma in sqlite_writer.PRAGMAS:
        cursor.execute(pragma)
    cursor.close()


async def migrate(engine: AsyncEngine) -> None:
    """Bring the schema to the newest migration (Alembic, run in-process)."""
    async with engine.begin() as connection:
        await connection.run_sync(_upgrade)


def _upgrade(connection: Connection) -> None:
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


def sessions(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


PRIVATE_FOLDER, PRIVATE_FILE = 0o700, 0o600  # what the data folder and its files are created with

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
