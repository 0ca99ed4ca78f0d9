"""Credentials for one provider as a pool: each key has a cap on active work; excess work waits its turn.

The caps are counted in `Slots`: in this process, or in Redis so that every node shares them."""

import asyncio
import contextlib
import hashlib
import logging
import sys
import time
from collections.abc import Callable, Sequence

from qubax.errors import UpstreamError
from qubax.limits.slots import LocalSlots, Slots

# How often work waiting for a slot looks again: a release on this node wakes it at once, one on
# another node is seen at the next look.
RECHECK_SECONDS = 0.05
logger = logging.getLogger("qubax")

# Told of each wait for an upstream's capacity: (upstream, what was waited for: "slot" or "connection", seconds).
Waited = Callable[[str, str, float], None]


def unwatched(upstream: str, resource: str, seconds: float) -> None:
    """The default `Waited`: nothing counted (the wait is logged all the same)."""


class KeyPool:
    def __init__(
        self,
        keys: Sequence[str],
        limit: int | None = None,
        slots: Slots | None = None,
        scope: str = "",
        waited: Waited = unwatched,
    ) -> None:
        if not keys:
            raise ValueError("a key pool needs at least one key")
        # Slot names carry a digest, never the credential: the shared store is not a secret store.
        self.credentials = {f"{scope}:{hashlib.sha256(key.encode()).hexdigest()[:16]}": key for key in keys}
        self.limit = sys.maxsize if limit is None else limit
        # Uncapped pools only spread work over their keys: nothing worth sharing between nodes.
        self.slots = slots if slots is not None and limit is not None else LocalSlots()
        self.released = asyncio.Event()
        self.scope, self.waited = scope, waited

    @property
    def keys(self) -> list[str]:
        return list(self.credentials.values())

    def lease(self, name: str | None = None) -> "Lease":
        """The least busy key (or the one `name` names), once it has a free slot; the slot is held until
        the block ends."""
        return Lease(self, name)

    def name_of(self, key: str) -> str:
        """How a key is named where a secret must not go (the database, the shared store): a digest."""
        return next(name for name, credential in self.credentials.items() if credential == key)


class Lease:
    """`KeyPool.lease()`'s block. A class rather than `contextlib.asynccontextmanager`, whose generator
    machinery is measurably dearer on the hot path (bench/README.md)."""

    def __init__(self, pool: KeyPool, name: str | None = None) -> None:
        self.pool = pool
        self.name = name
        self.taken: tuple[str, str] | None = None

    async def __aenter__(self) -> str:
        pool = self.pool
        names = list(pool.credentials) if self.name is None else [self.name]
        if self.name is not None and self.name not in pool.credentials:
            # Work started with a key the operator has since removed: nothing else may ask after it.
            raise UpstreamError("The upstream key that started this task is no longer configured.")
        taken = await pool.slots.take(names, pool.limit)
        self.taken = taken or await self.wait(names)
        return pool.credentials[self.taken[0]]

    async def wait(self, names: list[str]) -> tuple[str, str]:
        """Every key is at its cap: wait for a slot, and say so (a queue inside the node is otherwise silent)."""
        pool, started = self.pool, time.monotonic()
        upstream = pool.scope.removeprefix("upstream:")
        try:
            while (taken := await pool.slots.take(names, pool.limit)) is None:
                pool.released.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(RECHECK_SECONDS):
                        await pool.released.wait()
            return taken
        finally:
            seconds = time.monotonic() - started
            logger.info("%s: waited %.2f s for a slot (each key's cap is %d at once)", upstream, seconds, pool.limit)
            pool.waited(upstream, "slot", seconds)

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.taken is not None
        # In-process this never suspends, so a cancelled task still gives its slot back; in Redis
        # an interrupted give-back lapses on its own.
        await self.pool.slots.give_back(*self.taken)
        self.pool.released.set()
