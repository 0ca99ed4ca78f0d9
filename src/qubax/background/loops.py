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
    take: Callable[[int], Awaitable[list[T]]],
    run: Callable[[T], Coroutine[Any, Any, None]],
    posted: asyncio.Event,
    limit: int,
    poll_seconds: float,
) -> None:
    """Until cancelled; cancelling it cancels the work it runs, and waits for that work to stop.
    `take(room)` takes up to `room` pieces of work at once: one by one, a node whose database is busy
    (SQLite's one writer, behind a burst of submissions) takes work slower than its upstreams free up."""
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
                taken = await take(limit - len(running)) if len(running) < limit else []
            except Exception:  # a bug must not stop this node's work for good: the next look may do better
                logger.exception("taking work failed")
                taken = []
            for work in taken:
                task = asyncio.create_task(run(work))
                running.add(task)
                task.add_done_callback(ended)
            if taken:
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(poll_seconds):
                    await posted.wait()
    finally:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)


async def claim(
    sessions: async_sessionmaker[AsyncSession],
    candidates: "Select[T]",
    take: Callable[[list[T]], Update],
    count: int,
    ident: Callable[[T], str] = str,
) -> list[T]:
    """The first `count` rows (or ids) `candidates` selects that this node wins, in one transaction.
    `take(found)` must update them only while they still are candidates, returning the ids it updated
    (`ident` tells a row's): of several nodes, one wins each. PostgreSQL skips the rows another node is
    taking (`SKIP LOCKED`); SQLite has one writer at a time anyway."""
    try:
        async with sessions() as session:
            found = list(await session.scalars(candidates.limit(count).with_for_update(skip_locked=True)))
            if not found:
                return []
            # What was read stays as read: the update is matched in the database only.
            won = set((await session.execute(take(found).execution_options(synchronize_session=False))).scalars())
            await session.commit()
    except (OSError, SQLAlchemyError, DatabaseUnavailable) as exc:  # the database is away: the next look may do better
        logger.warning("taking work failed: %s", exc)
        return []
    return [item for item in found if ident(item) in won]
