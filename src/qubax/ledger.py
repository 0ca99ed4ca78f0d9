"""The usage ledger's writer: every request waits until its record is committed, but records from
concurrent requests share one transaction (group commit), so the database sees one write per batch
instead of one per request. SQLite allows a single writer; PostgreSQL saves a round trip per row."""

import asyncio
from typing import Any

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from qubax.db import Attempt, Base, Generation, now

Entry = tuple[Generation, list[Attempt], "asyncio.Future[None]"]


class Ledger:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.pending: list[Entry] = []
        self.writer: asyncio.Task[None] | None = None

    async def record(self, generation: Generation, attempts: list[Attempt]) -> None:
        """Return once the generation and its attempts are durable (raises if the write failed)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pending.append((generation, attempts, done))
        if self.writer is None or self.writer.done():
            self.writer = asyncio.create_task(self.drain())
        # Shielded: a client that disconnects now must not stop its record from being written.
        await asyncio.shield(done)

    async def drain(self) -> None:
        while self.pending:
            batch, self.pending = self.pending, []
            try:
                await self.write(batch)
            except Exception as exc:  # every waiter hears about it; the next batch tries afresh
                for _, _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
            else:
                for _, _, done in batch:
                    if not done.done():
                        done.set_result(None)

    async def write(self, batch: list[Entry]) -> None:
        generations = [row(generation) for generation, _, _ in batch]
        attempts = [row(attempt) for _, records, _ in batch for attempt in records]
        async with self.engine.begin() as connection:
            await connection.execute(insert(Generation), generations)
            if attempts:
                await connection.execute(insert(Attempt), attempts)

    async def close(self) -> None:
        if self.writer is not None:
            await asyncio.shield(self.writer)


def row(record: Base) -> dict[str, Any]:
    """The record's columns for a Core insert; ids the database assigns and unset timestamps filled."""
    values = {column.key: getattr(record, column.key) for column in record.__table__.columns}
    if values.get("created_at") is None:
        values["created_at"] = now()
    if isinstance(record, Attempt) and values["id"] is None:
        del values["id"]
    return values
