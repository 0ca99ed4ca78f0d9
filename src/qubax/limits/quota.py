"""Per-key limits: requests per minute (a maintained limiter library's moving window), concurrent
requests (`Slots`), both in-process, or in Redis so that every node shares them; images per day and
monthly spend (from the usage ledger, so every node sees the same totals)."""

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

from limits import RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import StorageError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from qubax.errors import LimitsUnavailable, QuotaExceeded, RateLimited
from qubax.limits.slots import Slots
from qubax.records import queries, tables
from qubax.routing.request import ImageRequest

# Wrong admin tokens one address may send a minute: the token is long, but guessing should not be free.
ADMIN_FAILURES = RateLimitItemPerMinute(10)
SLOT_WAIT_SECONDS = 0.25  # how often a job waiting for its key's concurrency looks again


def limiter_storage(redis_url: str | None) -> Storage:
    if redis_url is None:
        return MemoryStorage()
    from qubax.limits.shared_slots import blocking_pool  # the `redis` extra: only when asked for

    # wrap_exceptions: any Redis failure arrives as one StorageError, refused below as a 503.
    return RedisStorage(
        f"async+{redis_url}",
        wrap_exceptions=True,
        implementation="redispy",
        key_prefix="qubax:rpm",
        # Passed on to redis.asyncio.Redis, as limits documents; its annotation allows only scalars.
        connection_pool=blocking_pool(redis_url),  # type: ignore[arg-type]
    )


class Quotas:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], slots: Slots, storage: Storage) -> None:
        self.sessions = sessions
        self.slots = slots
        self.window = MovingWindowRateLimiter(storage)

    async def check_admin_failures(self, client: str) -> None:
        """Refuse (429) a client that failed the admin token too often lately, whatever it sends now."""
        try:
            allowed = await self.window.test(ADMIN_FAILURES, client, "admin")
            stats = None if allowed else await self.window.get_window_stats(ADMIN_FAILURES, client, "admin")
        except StorageError as exc:
            raise LimitsUnavailable(exc) from exc
        if stats is not None:
            raise RateLimited(
                f"Too many failed admin attempts from this address: at most {ADMIN_FAILURES.amount} a minute.",
                retry_after=max(1.0, stats.reset_time - time.time()),
            )

    async def count_admin_failure(self, client: str) -> None:
        try:
            await self.window.hit(ADMIN_FAILURES, client, "admin")
        except StorageError as exc:
            raise LimitsUnavailable(exc) from exc

    def hold(self, key: tables.KeyRecord, request: ImageRequest, concurrent: bool = True) -> "Hold":
        """Admit one request, or raise a 429; the block gets the rate headers to send back. The request's
        concurrency slot (unless not `concurrent`: a job takes one when it runs) and its reservations are
        held until the block ends."""
        return Hold(self, key, request, concurrent)

    @contextlib.asynccontextmanager
    async def running(self, key: tables.KeyRecord) -> AsyncIterator[None]:
        """A job's share of its key's concurrent requests: unlike a request, it waits its turn."""
        if key.max_concurrent is None:
            yield
            return
        # Polled: the slot may be freed on another node.
        while (taken := await self.slots.take([f"key:{key.id}"], key.max_concurrent)) is None:  # noqa: ASYNC110
            await asyncio.sleep(SLOT_WAIT_SECONDS)
        try:
            yield
        finally:
            await self.slots.give_back(*taken)

    async def count_request(self, key: tables.KeyRecord) -> dict[str, str]:
        if key.rpm is None:
            return {}
        item = RateLimitItemPerMinute(key.rpm)
        try:
            allowed = await self.window.hit(item, key.id)
            stats = await self.window.get_window_stats(item, key.id)
        except StorageError as exc:
            raise LimitsUnavailable(exc) from exc
        reset = max(0.0, stats.reset_time - time.time())
        headers = {
            "x-ratelimit-limit-requests": str(key.rpm),
            "x-ratelimit-remaining-requests": str(stats.remaining),
            "x-ratelimit-reset-requests": f"{math.ceil(reset)}s",
        }
        if not allowed:
            raise RateLimited(
                f"Rate limit reached for requests: this key allows {key.rpm} per minute.",
                retry_after=reset,
                headers=headers,
            )
        return headers

    async def check_ledger(self, key: tables.KeyRecord, request: ImageRequest, held: contextlib.AsyncExitStack) -> None:
        """Images per day and monthly spend: what the ledger has recorded, plus what requests in flight
        have reserved. Reserving before reading the ledger means concurrent requests cannot overshoot
        a limit together; at worst, one that would just fit is refused while another finishes."""
        if key.images_per_day is None and key.monthly_budget_micros is None:
            return
        cost = request.cost_micros(request.n, key.test)
        images_in_flight = await self.reserve(held, f"images:{key.id}", request.n) if key.images_per_day else 0
        cost_in_flight = await self.reserve(held, f"spend:{key.id}", cost) if key.monthly_budget_micros else 0
        now = datetime.now(UTC)
        day = now.replace(hour=0, minute=0, second=0, microsecond=0)
        month = day.replace(day=1)
        async with self.sessions() as session:
            today, spent = await queries.charged(session, key.id, day, month)
        if key.images_per_day is not None and today + images_in_flight > key.images_per_day:
            others = images_in_flight - request.n
            raise RateLimited(
                f"This key allows {key.images_per_day} images per day; {today} used today"
                + (f", {others} in requests still running." if others else "."),
                retry_after=(day + timedelta(days=1) - now).total_seconds(),
            )
        if key.monthly_budget_micros is not None and spent + cost_in_flight > key.monthly_budget_micros:
            next_month = (month + timedelta(days=32)).replace(day=1)
            raise QuotaExceeded(
                f"You exceeded this key's monthly budget of ${queries.to_usd(key.monthly_budget_micros):.2f} "
                f"(spent ${queries.to_usd(spent):.4f}).",
                retry_after=(next_month - now).total_seconds(),
            )

    async def reserve(self, held: contextlib.AsyncExitStack, name: str, amount: int) -> int:
        """Hold `amount` until `held` closes; returns the name's total in flight, this amount included."""
        token, total = await self.slots.reserve(name, amount)
        held.push_async_callback(self.slots.give_back, name, token)
        return total


class Hold:
    """`Quotas.hold()`'s block. A class rather than `contextlib.asynccontextmanager`, whose generator
    machinery is measurably dearer on the hot path (bench/README.md)."""

    def __init__(self, quotas: Quotas, key: tables.KeyRecord, request: ImageRequest, concurrent: bool = True) -> None:
        self.quotas, self.key, self.request = quotas, key, request
        self.max_concurrent = key.max_concurrent if concurrent else None
        self.held: contextlib.AsyncExitStack | None = None  # only keys with limits beyond the rate hold anything

    async def __aenter__(self) -> dict[str, str]:
        quotas, key = self.quotas, self.key
        headers = await quotas.count_request(key)
        if key.images_per_day is None and key.monthly_budget_micros is None and self.max_concurrent is None:
            return headers
        self.held = held = contextlib.AsyncExitStack()
        try:
            await quotas.check_ledger(key, self.request, held)
            if self.max_concurrent is not None:
                taken = await quotas.slots.take([f"key:{key.id}"], self.max_concurrent)
                if taken is None:
                    raise RateLimited(f"This key allows {self.max_concurrent} concurrent requests.", retry_after=1)
                held.push_async_callback(quotas.slots.give_back, *taken)
        except BaseException:
            await held.aclose()
            raise
        return headers

    async def __aexit__(self, *exc_info: object) -> None:
        if self.held is not None:
            await self.held.aclose()
