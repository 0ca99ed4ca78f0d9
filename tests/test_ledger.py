"""The usage ledger: each record is committed before `record` returns, concurrent records share a
transaction, a failed write fails only its own batch, and a SQLite file written by its own process
holds exactly what SQLAlchemy would have written."""

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from qubax.records import db, queries, tables
from qubax.records.ledger import (
    AttemptRecord,
    EngineSink,
    GenerationRecord,
    Ledger,
    Row,
    SqliteSink,
)
from qubax.records.sqlite_writer import ROWS_PER_STATEMENT
from qubax.server.settings import Settings

pytestmark = pytest.mark.anyio


@pytest.fixture
async def engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    """The test database (SQLite file, or PostgreSQL with --database=postgresql), migrated, with one key."""
    engine = db.connect(settings.resolved_database_url)
    await db.migrate(engine)
    async with db.sessions(engine)() as session:
        await queries.add_key(session, name="k", prefix="qbx_live_abcd", digest="d" * 64, test=False)
    yield engine
    await engine.dispose()


async def key_id(engine: AsyncEngine) -> str:
    async with db.sessions(engine)() as session:
        return (await session.scalars(select(tables.ApiKey.id))).one()


def generation(key: str, *, model: Any = "dall-e-3", attempts: int = 1) -> GenerationRecord:
    record = GenerationRecord(tables.new_id("gen"), key, model, 1, "1024x1024", "openai", 1, 40_000, 12)
    record.attempts = [AttemptRecord("openai", "dall-e-3", 1, 1, 10) for _ in range(attempts)]
    return record


async def count(engine: AsyncEngine, model: type[tables.Base]) -> int:
    async with db.sessions(engine)() as session:
        return int(await session.scalar(select(func.count()).select_from(model)) or 0)


class CountingSink:
    """Wraps the ledger's own sink and counts the transactions it was asked for."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.batches = inner, 0

    async def insert(self, generations: list[Row], attempts: list[Row]) -> None:
        self.batches += 1
        await self.inner.insert(generations, attempts)

    async def close(self) -> None:
        await self.inner.close()


async def test_a_record_is_committed_before_record_returns(engine: AsyncEngine) -> None:
    ledger = Ledger(engine)
    await ledger.record(generation(await key_id(engine), attempts=2))
    # Read through a different connection: only committed rows are visible there.
    assert await count(engine, tables.Generation) == 1
    assert await count(engine, tables.Attempt) == 2
    await ledger.close()


async def test_a_sqlite_file_is_written_by_its_own_process(engine: AsyncEngine, settings: Settings) -> None:
    ledger = Ledger(engine)
    expected = EngineSink if settings.database_url else SqliteSink
    assert isinstance(ledger.sink, expected)
    await ledger.close()


async def test_the_writer_process_comes_back_after_it_died(engine: AsyncEngine, settings: Settings) -> None:
    if settings.database_url:
        pytest.skip("PostgreSQL is written through the engine")
    ledger = Ledger(engine)
    key = await key_id(engine)
    await ledger.record(generation(key))
    assert isinstance(ledger.sink, SqliteSink)
    process = ledger.sink.writer.process
    assert process is not None
    process.kill()
    assert ledger.sink.writer.reader is not None
    await ledger.sink.writer.reader  # it has seen the helper go
    await ledger.record(generation(key))  # through a new one
    assert ledger.sink.writer.process is not None and ledger.sink.writer.process.pid != process.pid
    assert await count(engine, tables.Generation) == 2
    await ledger.close()


async def test_concurrent_records_share_transactions(engine: AsyncEngine) -> None:
    ledger = Ledger(engine)
    sink = ledger.sink = CountingSink(ledger.sink)
    key = await key_id(engine)
    await asyncio.gather(*(ledger.record(generation(key)) for _ in range(200)))
    assert await count(engine, tables.Generation) == 200 and await count(engine, tables.Attempt) == 200
    assert sink.batches < 20  # one while the first batch was being written, then the rest together
    await ledger.close()


async def test_a_batch_larger_than_one_statement_is_written_whole(engine: AsyncEngine) -> None:
    ledger = Ledger(engine)
    key = await key_id(engine)
    records = [generation(key) for _ in range(ROWS_PER_STATEMENT * 2 + 7)]
    await ledger.write(records)
    assert await count(engine, tables.Generation) == len(records)
    await ledger.close()


async def test_a_failed_write_fails_its_batch_and_the_next_one_succeeds(engine: AsyncEngine) -> None:
    ledger = Ledger(engine)
    key = await key_id(engine)
    broken = generation(key, model=None)  # `model` is NOT NULL
    with pytest.raises(Exception, match=r"(?i)not.null"):
        await ledger.record(broken)
    await ledger.record(generation(key))
    assert await count(engine, tables.Generation) == 1  # the broken batch left nothing behind
    await ledger.close()


async def test_a_client_that_leaves_while_its_record_is_written_still_gets_it_written(engine: AsyncEngine) -> None:
    ledger = Ledger(engine)
    waiting = asyncio.ensure_future(ledger.record(generation(await key_id(engine))))
    await asyncio.sleep(0)
    waiting.cancel()
    assert ledger.writer is not None
    await ledger.writer
    assert await count(engine, tables.Generation) == 1
    await ledger.close()


async def test_the_writer_process_writes_what_sqlalchemy_writes(engine: AsyncEngine, settings: Settings) -> None:
    if settings.database_url:
        pytest.skip("compares two ways of writing a SQLite file")
    key = await key_id(engine)
    path = str(engine.url.database)
    first, second = generation(key), generation(key)
    second.error, second.cost_micros = "a quote ' and a long cost", 2**40  # text and 64-bit integers survive
    for sink, record in ((SqliteSink(path), first), (EngineSink(engine), second)):
        ledger = Ledger(engine)
        ledger.sink = sink
        await ledger.record(record)
        await ledger.close()
    with sqlite3.connect(path) as connection:
        rows = connection.execute("SELECT * FROM generations ORDER BY id").fetchall()
        attempts = connection.execute("SELECT * FROM attempts ORDER BY id").fetchall()
    assert [row[1:-1] for row in rows] == [
        (key, "dall-e-3", "openai", 1, "1024x1024", 1, 40_000, 12, "ok", None),
        (key, "dall-e-3", "openai", 1, "1024x1024", 1, 2**40, 12, "ok", "a quote ' and a long cost"),
    ]
    assert [attempt[2:-1] for attempt in attempts] == [("openai", "dall-e-3", 1, 1, 10, "ok", None)] * 2
    # Both time stamps are stored the same way, so SQLAlchemy reads them back and compares them alike.
    stamps = [row[-1] for row in rows]
    assert len({len(stamp) for stamp in stamps}) == 1 and "+" not in stamps[0]
    async with db.sessions(engine)() as session:
        read = (await session.scalars(select(tables.Generation.created_at).order_by(tables.Generation.id))).all()
    assert all(abs(stamp.replace(tzinfo=UTC) - datetime.now(UTC)) < timedelta(minutes=1) for stamp in read)
