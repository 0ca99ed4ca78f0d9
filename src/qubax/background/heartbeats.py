"""A node says its running jobs are alive, and learns which of them their keys asked to cancel: every
job it runs in one statement a beat (a few statements for thousands), rather than one per job, which
cost a node running 1,000 jobs 1,000 writes a second (bench/README.md, issue 27 item 4)."""

import asyncio
import logging

from sqlalchemy import update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from qubax.errors import DatabaseUnavailable
from qubax.records import tables

logger = logging.getLogger("qubax")
RUNNING = tables.ImageJob.status == "in_progress"
CHUNK = 1000  # ids a statement names: well under SQLite's and asyncpg's limits on bound parameters


class Heartbeats:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], beat_seconds: float) -> None:
        self.sessions = sessions
        self.beat_seconds = beat_seconds
        self.works: dict[str, asyncio.Task[bytes]] = {}  # the jobs this node runs, by id: their work

    def add(self, job_id: str, work: "asyncio.Task[bytes]") -> None:
        self.works[job_id] = work

    def discard(self, job_id: str) -> None:
        self.works.pop(job_id, None)

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self.beat_seconds)
            await self.beat()

    async def beat(self) -> None:
        """Say every running job alive; cancel the work of those whose key asked to cancel them."""
        ids = list(self.works)
        for start in range(0, len(ids), CHUNK):
            try:
                cancelled = await self.say_alive(ids[start : start + CHUNK])
            except (OSError, SQLAlchemyError, DatabaseUnavailable) as exc:
                # A missed beat only risks a takeover, never the work.
                logger.warning("jobs' heartbeat failed: %s", exc)
                continue
            for job_id in cancelled:
                work = self.works.pop(job_id, None)
                if work is not None:
                    work.cancel()

    async def say_alive(self, ids: list[str]) -> list[str]:
        """The ids, among those still running, whose key asked to cancel them."""
        async with self.sessions() as session:
            rows = await session.execute(
                update(tables.ImageJob)
                .where(tables.ImageJob.id.in_(ids), RUNNING)
                .values(heartbeat_at=tables.now())
                .returning(tables.ImageJob.id, tables.ImageJob.cancel_requested)
                .execution_options(synchronize_session=False)
            )
            cancelled = [job_id for job_id, cancel in rows.all() if cancel]
            await session.commit()
        return cancelled
