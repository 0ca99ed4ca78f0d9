"""The usage ledger's writer: every request waits until its record is committed, but records from
concurrent requests share one transaction (group commit), so the database sees one write per batch
instead of one per request. SQLite allows a single writer; PostgreSQL saves a round trip per row."""

import asyncio
import contextlib
import dataclasses
import functools
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import Table, insert
from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from qubax.db import Attempt, Base, Generation, now, tune_sqlite


@dataclass(slots=True)
class AttemptRecord:
    """One try of one route; a row of `attempts`. Plain slots, not an ORM object: building ORM
    instances cost ~20 µs a request on the hot path (bench/README.md)."""

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
        # Shielded: a client that disconnects now must not stop its record from being written.
        await asyncio.shield(done)

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
        # The writer keeps one connection: checking one out of the pool and resetting it on return cost
        # ~30% of a small batch's CPU.
        self.connection: AsyncConnection | None = None

    async def insert(self, generations: list[Row], attempts: list[Row]) -> None:
        if self.connection is None:
            self.connection = await self.engine.connect()
        try:
            async with self.connection.begin():
                await self.connection.execute(insert(Generation), generations)
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


class SqliteSink:
    """A SQLite file: each batch is one trip to a thread of its own, which holds a plain `sqlite3`
    connection and writes one INSERT per table. Through aiosqlite a batch took seven thread hops, and
    the driver hands the GIL over around every row it steps through: each hand-over is a forced
    switch that the event loop's thread pays for. This way costs ~12% more throughput on the light
    benchmark (bench/README.md)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="qubax-ledger")
        self.connection: sqlite3.Connection | None = None  # used in that thread only

    async def insert(self, generations: list[Row], attempts: list[Row]) -> None:
        await asyncio.get_running_loop().run_in_executor(self.thread, self.insert_now, generations, attempts)

    def insert_now(self, generations: list[Row], attempts: list[Row]) -> None:
        if self.connection is None:
            self.connection = sqlite3.connect(self.path, timeout=5)
            tune_sqlite(self.connection, None)
        try:
            with self.connection:  # one transaction: commits, or rolls back and raises
                for table, rows in ((GENERATIONS, generations), (ATTEMPTS, attempts)):
                    for start in range(0, len(rows), ROWS_PER_STATEMENT):
                        self.connection.execute(*insert_statement(table, rows[start : start + ROWS_PER_STATEMENT]))
        except sqlite3.Error:
            connection, self.connection = self.connection, None  # the next batch starts on a fresh one
            connection.close()
            raise

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self.thread, self.close_now)
        self.thread.shutdown()

    def close_now(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


ROWS_PER_STATEMENT = 500  # SQLite takes at most 32,766 parameters a statement
SQLITE = sqlite_dialect()
GENERATIONS, ATTEMPTS = (Base.metadata.tables[model.__tablename__] for model in (Generation, Attempt))


def insert_statement(table: Table, rows: list[Row]) -> tuple[str, list[Any]]:
    """One multi-row INSERT, its values converted as SQLAlchemy converts them for SQLite (dates as text)."""
    columns = tuple(rows[0])
    convert = converters(table, columns)
    values = "(" + ", ".join("?" * len(columns)) + ")"
    sql = f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES {', '.join([values] * len(rows))}"
    return sql, [to(row[column]) for row in rows for column, to in zip(columns, convert, strict=True)]


@functools.cache
def converters(table: Table, columns: tuple[str, ...]) -> list[Callable[[Any], Any]]:
    types = [table.c[column].type.dialect_impl(SQLITE) for column in columns]
    return [kind.bind_processor(SQLITE) or same for kind in types]


def same(value: Any) -> Any:
    return value


def generation_row(record: GenerationRecord, created_at: Any) -> Row:
    row = {name: getattr(record, name) for name in GENERATION_COLUMNS}
    row["created_at"] = created_at
    return row


def attempt_row(record: AttemptRecord, generation_id: str, created_at: Any) -> Row:
    row = {name: getattr(record, name) for name in ATTEMPT_COLUMNS}
    row["generation_id"], row["created_at"] = generation_id, created_at
    return row
