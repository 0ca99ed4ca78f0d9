"""The loop that job runners and webhook deliverers share: take work that the database says is due,
run a bounded number at once, and look again when a place frees up, when this node posts work, or
every few seconds (for work other nodes posted)."""

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from sqlalchemy import Select, Update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from qubax.errors import DatabaseUnavailable

T = TypeVar("T")
logger = logging.getLogger("qubax")


async def take_and_run(
    take: Callable[[], Awaitable[T | None]],
    run: Callable[[T], Coroutine[Any, Any, None]],
    posted: asyncio.Event,
    limit: int,
    poll_seconds: float,
) -> None:
    """Until cancelled; cancelling it cancels the work it runs, and waits for that work to stop."""
    running: set[asyncio.Task[None]] = set()

    def ended(task: "asyncio.Task[None]") -> None:
        running.discard(task)
        posted.set()  # a place is free: look for more
        if not task.cancelled() and (error := task.exception()) is not None:
            # Its work stays due (a job still in progress, a delivery still pending): it is taken again.
            logger.error("background work failed: %s", error, exc_info=error)

    try:
        while True:
            posted.clear()
            try:
                work = await take() if len(running) < limit else None
            except Exception:  # a bug must not stop this node's work for good: the next look may do better
                logger.exception("taking work failed")
                work = None
            if work is not None:
                task = asyncio.create_task(run(work))
                running.add(task)
                task.add_done_callback(ended)
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(poll_seconds):
                    await posted.wait()
    finally:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)


async def claim(
    sessions: async_sessionmaker[AsyncSession], candidates: "Select[T]", take: Callable[[T], Update]
) -> T | None:
    """The first row (or id) `candidates` selects that this node wins, or None. `take(found)` must update
    it only while it still is a candidate: of several nodes, one wins each. PostgreSQL skips the rows
    another node is taking (`SKIP LOCKED`); SQLite has one writer at a time anyway."""
    try:
        async with sessions() as session:
            found = await session.scalar(candidates.limit(1).with_for_update(skip_locked=True))
            if found is None:
                return None
            # What was read stays as read: the update is matched in the database only.
            taken = await session.execute(take(found).execution_options(synchronize_session=False))
            await session.commit()
    except (OSError, SQLAlchemyError, DatabaseUnavailable) as exc:  # the database is away: the next look may do better
        logger.warning("taking work failed: %s", exc)
        return None
    return found if taken.rowcount else None  # type: ignore[attr-defined]
