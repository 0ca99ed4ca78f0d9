"""The usage ledger's writer: every request waits until its record is committed, but records from
concurrent requests share one transaction (group commit), so the database sees one write per batch
instead of one per request. SQLite allows a single writer; PostgreSQL saves a round trip per row."""

import asyncio
import contextlib
import dataclasses
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import orjson
from sqlalchemy import insert
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from qubax.errors import DatabaseUnavailable
from qubax.records.db import UNAVAILABLE
from qubax.records.tables import Attempt, Base, Generation, now
from qubax.records.writers import WriteFailed, WriterProcess
from qubax.server import traces

logger = logging.getLogger("qubax")


@dataclass(slots=True)
class AttemptRecord:
    """One try of one route; a row of `attempts`. Plain slots, not an ORM object: building ORM
    instances is measurably dearer on the hot path (bench/README.md)."""

    upstream: str
    upstream_model: str
    n: int
    images: int = 0
    latency_ms: int = 0
    outcome: str = "ok"
    error: str | None = None


@dataclass(slots=True)
class GenerationRecord:
    """One request's usage; a row of `generations`, with its attempts."""

    id: str
    key_id: str
    model: str
    n: int
    size: str
    upstream: str = ""
    images: int = 0
    cost_micros: int = 0
    latency_ms: int = 0
    outcome: str = "ok"
    error: str | None = None
    attempts: list[AttemptRecord] = field(default_factory=list)


GENERATION_COLUMNS = [f.name for f in dataclasses.fields(GenerationRecord) if f.name != "attempts"]
ATTEMPT_COLUMNS = [f.name for f in dataclasses.fields(AttemptRecord)]
Entry = tuple[GenerationRecord, "asyncio.Future[None]"]


class Ledger:
    def __init__(self, engine: AsyncEngine) -> None:
        self.pending: list[Entry] = []
        self.writer: asyncio.Task[None] | None = None
        path = engine.url.database
        file = engine.url.get_backend_name() == "sqlite" and path not in (None, "", ":memory:")
        self.sink: Sink = SqliteSink(str(path)) if file else EngineSink(engine)

    async def record(self, generation: GenerationRecord) -> None:
        """Return once the generation and its attempts are durable (raises if the write failed)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pending.append((generation, done))
        if self.writer is None or self.writer.done():
            self.writer = asyncio.create_task(self.drain())
        with traces.span("qubax.ledger.record") as span:  # the wait for its batch's commit
            if span is not None:
                span.set_attributes({"qubax.outcome": generation.outcome, "qubax.images.made": generation.images})
            # A client that disconnects now cancels only this wait: the record is in the batch, and is written.
            await done

    async def drain(self) -> None:
        while self.pending:
            batch, self.pending = self.pending, []
            try:
                await self.write([generation for generation, _ in batch])
            except Exception as exc:  # every waiter hears about it; the next batch tries afresh
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
            else:
                for _, done in batch:
                    if not done.done():
                        done.set_result(None)

    async def write(self, generations: list[GenerationRecord]) -> None:
        created_at = now()
        rows = [generation_row(generation, created_at) for generation in generations]
        attempts = [
            attempt_row(attempt, generation.id, created_at)
            for generation in generations
            for attempt in generation.attempts
        ]
        await self.sink.insert(rows, attempts)

    async def close(self) -> None:
        if self.writer is not None:
            await asyncio.shield(self.writer)
        await self.sink.close()


Row = dict[str, Any]


class Sink(Protocol):
    async def insert(self, generations: list[Row], attempts: list[Row]) -> None:
        """Commit the rows in one transaction."""

    async def close(self) -> None: ...


class EngineSink:
    """Any database, through the app's engine (asyncpg for PostgreSQL)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        # The writer keeps one connection: checking one out of the pool and resetting it on return was
        # a large share of a small batch's CPU (bench/README.md).
        self.connection: AsyncConnection | None = None
        dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
        self.new_generations = dialect.insert(Generation).on_conflict_do_nothing()  # `recording.finish`

    async def insert(self, generations: list[Row], attempts: list[Row]) -> None:
        if self.connection is None:
            self.connection = await self.engine.connect()
        try:
            async with self.connection.begin():
                await self.connection.execute(self.new_generations, generations)
                if attempts:
                    await self.connection.execute(insert(Attempt), attempts)
        except Exception:
            connection, self.connection = self.connection, None  # the next batch starts on a fresh one
            with contextlib.suppress(Exception):  # it may be the broken part
                await connection.invalidate()
            raise

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close()


# How the helper says the file cannot be written now: SQLite's own words (`sqlite3_errstr`) for a full
# disk, an I/O error, a lock held too long and a file it cannot open, or its own end.
SQLITE_UNAVAILABLE = (
    "database or disk is full",
    "disk I/O error",
    "database is locked",
    "unable to open database file",
    "the helper process",
)


class SqliteSink:
    """A SQLite file, written by a helper process (`writers.py` says why), one multi-row INSERT per
    table and one transaction per batch."""

    def __init__(self, path: str) -> None:
        self.writer = WriterProcess("qubax.records.sqlite_writer", path)

    async def insert(self, generations: list[Row], attempts: list[Row]) -> None:
        tables = ((Generation.__tablename__, generations), (Attempt.__tablename__, attempts))
        # Each table's rows as value lists; the helper builds the statements, off this loop.
        inserts = [[table, list(rows[0]), [list(row.values()) for row in rows]] for table, rows in tables if rows]
        # A batch's rows share one time stamp (`Ledger.write`): converted once, not once a row.
        stamps: dict[datetime, str] = {}

        def value(value: Any) -> Any:
            if isinstance(value, datetime):
                if value not in stamps:
                    stamps[value] = sqlite_value(value)
                return stamps[value]
            return sqlite_value(value)

        try:
            await self.writer.call(orjson.dumps(inserts, default=value, option=orjson.OPT_PASSTHROUGH_DATETIME))
        except WriteFailed as exc:
            if not str(exc).startswith(SQLITE_UNAVAILABLE):
                raise  # a bad batch: a bug, not the file
            # The disk is full, say: these requests are not recorded, so not charged.
            logger.warning("the usage ledger could not write %d records: %s", len(generations), exc)
            raise DatabaseUnavailable(UNAVAILABLE) from exc

    async def close(self) -> None:
        await self.writer.close()


SQLITE = sqlite_dialect()
# How SQLAlchemy stores a date and time in SQLite (text), so both ways of writing agree.
CREATED_AT = Base.metadata.tables[Generation.__tablename__].c.created_at.type
SQLITE_DATETIME = CREATED_AT.dialect_impl(SQLITE).bind_processor(SQLITE)


def sqlite_value(value: Any) -> Any:
    if isinstance(value, datetime) and SQLITE_DATETIME is not None:
        return SQLITE_DATETIME(value)
    raise TypeError(f"no SQLite value for {type(value).__name__}")


def generation_row(record: GenerationRecord, created_at: Any) -> Row:
    row = {name: getattr(record, name) for name in GENERATION_COLUMNS}
    row["created_at"] = created_at
    return row


def attempt_row(record: AttemptRecord, generation_id: str, created_at: Any) -> Row:
    row = {name: getattr(record, name) for name in ATTEMPT_COLUMNS}
    row["generation_id"], row["created_at"] = generation_id, created_at
    return row
