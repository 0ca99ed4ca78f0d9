"""Holds on shared counts: slots (at most `limit` holders of a name at once: a key's concurrent requests,
an upstream credential's active tasks) and reservations (amounts in flight: the images and spend of a
key's running requests, which its daily and monthly limits must count before the ledger has them).
In-process by default; in Redis (`shared_slots`, the `redis` extra) when several nodes must share them.
"""

import contextlib
import itertools
from collections.abc import AsyncIterator, Sequence
from typing import Protocol


class Slots(Protocol):
    async def take(self, names: Sequence[str], limit: int) -> tuple[str, str] | None:
        """A slot of the least busy of `names` with one free: (name, holder token), or None."""
        ...

    async def reserve(self, name: str, amount: int) -> tuple[str, int]:
        """Hold `amount` of a name: (holder token, the total now held, this amount included)."""
        ...

    async def give_back(self, name: str, token: str) -> None:
        """End a hold, whether a slot or a reservation."""
        ...

    async def check(self) -> None:
        """Raise `LimitsUnavailable` when the counts cannot be reached (for the health check)."""
        ...


@contextlib.asynccontextmanager
async def open_slots(redis_url: str | None, hold_seconds: float) -> AsyncIterator[Slots]:
    """Slots in Redis when a URL is given, for the life of the block; otherwise in this process."""
    if redis_url is None:
        yield LocalSlots()
        return
    from qubax.limits.shared_slots import RedisSlots, connect_redis  # the `redis` extra: only when asked for

    redis = await connect_redis(redis_url)
    try:
        yield RedisSlots(redis, hold_seconds)
    finally:
        await redis.aclose()


class LocalSlots:
    """Counts in this process's memory."""

    def __init__(self) -> None:
        self.held: dict[str, dict[str, int]] = {}  # name -> holder token -> amount
        self.tokens = itertools.count()

    async def take(self, names: Sequence[str], limit: int) -> tuple[str, str] | None:
        name = min(names, key=lambda name: len(self.held.get(name, ())))
        if len(self.held.get(name, ())) >= limit:
            return None
        return name, self.add(name, 1)

    async def reserve(self, name: str, amount: int) -> tuple[str, int]:
        token = self.add(name, amount)
        return token, sum(self.held[name].values())

    def add(self, name: str, amount: int) -> str:
        token = str(next(self.tokens))
        self.held.setdefault(name, {})[token] = amount
        return token

    async def check(self) -> None:
        return None

    async def give_back(self, name: str, token: str) -> None:
        holders = self.held[name]
        del holders[token]
        if not holders:
            del self.held[name]
