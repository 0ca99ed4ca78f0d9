"""Credentials for one provider as a pool: each key has a cap on active work; excess work waits its turn."""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence


class KeyPool:
    def __init__(self, keys: Sequence[str], limit: int | None = None) -> None:
        if not keys:
            raise ValueError("a key pool needs at least one key")
        self.active = dict.fromkeys(keys, 0)
        self.limit = limit
        self.released = asyncio.Event()

    @property
    def keys(self) -> list[str]:
        return list(self.active)

    @contextlib.asynccontextmanager
    async def lease(self) -> AsyncIterator[str]:
        """The least busy key, once one has a free slot; the slot is held until the block ends."""
        key = min(self.active, key=self.active.__getitem__)
        while self.limit is not None and self.active[key] >= self.limit:
            self.released.clear()
            await self.released.wait()
            key = min(self.active, key=self.active.__getitem__)
        self.active[key] += 1
        try:
            yield key
        finally:
            # No await here: a cancelled task must still give its slot back.
            self.active[key] -= 1
            self.released.set()
