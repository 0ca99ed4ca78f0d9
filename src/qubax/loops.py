"""The loop that job runners and webhook deliverers share: take work that the database says is due,
run a bounded number at once, and look again when a place frees up, when this node posts work, or
every few seconds (for work other nodes posted)."""

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

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
