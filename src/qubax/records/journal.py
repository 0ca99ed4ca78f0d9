"""The journal of upstream tasks: what an upstream accepted for a job or an idempotent request (a task
id, its URLs, the key that owns it), written before anyone waits on it.

A node that dies while waiting leaves its notes behind. Whoever takes the work over (another node's
job runner, or the retry of an idempotent request) opens the same owner's journal, and each adapter
waits on the task noted for its call instead of submitting, and paying for, the work again. The notes
go when their owner ends; any left behind are swept after a day.
"""

import contextlib
import hashlib
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import orjson
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from qubax.providers import journal
from qubax.records import tables

LIFETIME = timedelta(days=2)  # longer than any owner's: a job's run, an idempotent request's day


class Journal:
    """One owner's notes (`providers.TaskJournal`): those found when it opened, handed out once each."""

    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], owner: str, noted: list[tables.UpstreamTask]
    ) -> None:
        self.sessions = sessions
        self.owner = owner
        self.noted = [((row.provider, row.upstream_model, row.images), orjson.loads(row.handle)) for row in noted]

    def take(self, provider: str, model: str, count: int) -> dict[str, Any] | None:
        for i, (what, handle) in enumerate(self.noted):
            if what == (provider, model, count):
                del self.noted[i]
                return dict(handle)
        return None

    async def record(self, provider: str, model: str, count: int, handle: dict[str, Any]) -> None:
        async with self.sessions() as session:
            session.add(
                tables.UpstreamTask(
                    owner=self.owner,
                    provider=provider,
                    upstream_model=model,
                    images=count,
                    handle=orjson.dumps(handle).decode(),
                    created_at=tables.now(),
                )
            )
            await session.commit()


@contextlib.asynccontextmanager
async def kept(sessions: async_sessionmaker[AsyncSession], owner: str) -> AsyncIterator[None]:
    """Upstream tasks started inside are noted for `owner`; tasks noted for it before are waited on again."""
    async with sessions() as session:
        query = select(tables.UpstreamTask).where(tables.UpstreamTask.owner == owner).order_by(tables.UpstreamTask.id)
        noted = list(await session.scalars(query))
    token = journal.set(Journal(sessions, owner, noted))
    try:
        yield
    finally:
        journal.reset(token)


async def forget(sessions: async_sessionmaker[AsyncSession], owner: str) -> None:
    """The owner ended: its tasks will not be waited on again."""
    async with sessions() as session:
        await session.execute(delete(tables.UpstreamTask).where(tables.UpstreamTask.owner == owner))
        await session.commit()


def job_owner(job_id: str) -> str:
    return f"job:{job_id}"


def request_owner(key_id: str, token: str) -> str:
    """An idempotent request's name in the journal (its Idempotency-Key may be 255 characters long)."""
    return "idem:" + hashlib.sha256(f"{key_id}\0{token}".encode()).hexdigest()


async def sweep(sessions: async_sessionmaker[AsyncSession]) -> int:
    """Forget notes whose owner never ended (it was abandoned and never retried); returns how many."""
    async with sessions() as session:
        result = await session.execute(
            delete(tables.UpstreamTask).where(tables.UpstreamTask.created_at < tables.now() - LIFETIME)
        )
        await session.commit()
    return int(result.rowcount)  # type: ignore[attr-defined]
