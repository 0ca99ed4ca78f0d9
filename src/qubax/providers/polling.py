"""Work an asynchronous upstream accepted: noted before it is waited on, taken up again by a node
that outlives the one that started it, polled until it ends, and cancelled when nobody will collect it."""

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from qubax.errors import UpstreamError
from qubax.providers import Upstream, journal
from qubax.providers.transport import Http, send

T = TypeVar("T")
# A task that is already running (and billed) deserves more than one bad poll before we give up on it.
POLL_RETRIES = 5
CANCEL_TIMEOUT = 5.0  # seconds a best-effort cancel may take once our caller has gone


def resumable(provider: str, model: str, count: int) -> dict[str, Any] | None:
    """A task for this work that a node which died had started (`TaskJournal`): wait on it again."""
    noted = journal.get()
    return None if noted is None else noted.take(provider, model, count)


async def accepted(upstream: Upstream, key: str, provider: str, model: str, count: int, handle: dict[str, Any]) -> None:
    """Note a task the upstream accepted under `key`, durably, before anyone waits on it; the note names
    the key by its digest, which `Upstream.lease(task)` leases again."""
    noted = journal.get()
    if noted is not None:
        await noted.record(provider, model, count, handle | {"key": upstream.key_name(key)})


async def poll(
    check: Callable[[], Awaitable[T | None]], interval: float, woken: asyncio.Event | None = None, slow: float = 0.0
) -> T:
    """Call `check` until it returns a value; the caller's deadline bounds the wait. With `woken` (the
    task's callback: `callbacks.Callbacks.waiting`), each pause lasts until it is set, or `slow` seconds.

    Transient failures (retryable errors) are retried with growing pauses, a few times in a row.
    """
    failures = 0
    while True:
        try:
            result = await check()
        except UpstreamError as exc:
            failures += 1
            if not exc.retryable or failures > POLL_RETRIES:
                raise
            await asyncio.sleep(interval * 2**failures)
            continue
        failures = 0
        if result is not None:
            return result
        if woken is None:
            await asyncio.sleep(interval)
            continue
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(woken.wait(), slow)
        woken.clear()


async def cancel_quietly(http: Http, method: str, url: str, headers: Mapping[str, str]) -> None:
    """Best-effort cancel of upstream work nobody will collect, even while our own task is being
    cancelled: shielded, bounded, and its failures ignored."""
    with contextlib.suppress(Exception):
        await asyncio.shield(asyncio.wait_for(send(http, "upstream", method, url, headers=headers), CANCEL_TIMEOUT))
