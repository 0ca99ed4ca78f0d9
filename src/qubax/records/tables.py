"""The database's tables, as ORM models (API keys, the usage ledger, idempotent requests, jobs and the
upstream work they wait on, webhook deliveries, console sessions), with the ids and times stored in them.

Kept apart from opening the database (`db`) and from the queries several modules share (`queries`):
most modules only read and write rows, and import this alone."""

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from time import time_ns

from sqlalchemy import BigInteger, Boolean, DateTime, ForeignKey, Index, Integer, LargeBinary, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


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
    # The runner takes the oldest queued job: read off this index in order, not by sorting every queued
    # job for each one taken (10,000 queued cost SQLite ~7 ms a take; bench/README.md, issue 27 item 4).
    __table_args__ = (Index("ix_image_jobs_status_id", "status", "id"),)

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
