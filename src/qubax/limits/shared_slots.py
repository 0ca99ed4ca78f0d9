"""Slots and reservations (`qubax.slots`) shared by every node through one Redis.

Redis keeps each name as a sorted set of holders scored by when their hold lapses. A node that dies
holding slots cannot give them back, so a hold lapses on its own after `hold_seconds`, which callers
set longer than any request may run (the request deadline bounds every holder).
"""

import logging
import secrets
from collections.abc import Sequence

from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import RedisError

from qubax.errors import LimitsUnavailable

logger = logging.getLogger(__name__)
# Limits are checked on every request: a Redis that stops answering (frozen, or its host gone) gets
# requests refused with 503 limits_unavailable after this long, instead of holding them for ever.
REDIS_TIMEOUT_SECONDS = 2.0
# Connections to Redis per process. Past them a command waits for one (each takes well under a
# millisecond) rather than failing, as redis-py's own pool does past 100 at once: a node with hundreds
# of requests in flight answered them 503 (tests/test_upstream_capacity.py).
REDIS_CONNECTIONS = 100
POOL_WAIT_SECONDS = 10.0

# KEYS: the names to choose among; ARGV: limit, hold in milliseconds, holder token. Takes a slot of the
# least busy name that has one free; returns its index (1-based), or 0. Redis's clock, not the nodes'.
TAKE_LEAST_BUSY = """
local clock = redis.call('TIME')
local now = clock[1] * 1000 + math.floor(clock[2] / 1000)
local lapses = now + tonumber(ARGV[2])
local best, best_count = 0, nil
for i, name in ipairs(KEYS) do
    redis.call('ZREMRANGEBYSCORE', name, '-inf', now)
    local count = redis.call('ZCARD', name)
    if count < tonumber(ARGV[1]) and (best_count == nil or count < best_count) then
        best, best_count = i, count
    end
end
if best > 0 then
    redis.call('ZADD', KEYS[best], lapses, ARGV[3])
    redis.call('PEXPIREAT', KEYS[best], lapses)
end
return best
"""
# KEYS: one name; ARGV: hold in milliseconds, holder token ending in ":<amount>". Adds the hold and
# returns the sum of every live hold's amount, this one included.
RESERVE = """
local clock = redis.call('TIME')
local now = clock[1] * 1000 + math.floor(clock[2] / 1000)
local lapses = now + tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], lapses, ARGV[2])
redis.call('PEXPIREAT', KEYS[1], lapses)
local total = 0
for _, token in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
    total = total + tonumber(string.match(token, ':(%d+)$'))
end
return total
"""


def blocking_pool(url: str) -> BlockingConnectionPool:
    """Connections to the Redis at `url`, for the slots' client and the rate limiter's."""
    return BlockingConnectionPool.from_url(
        url,
        max_connections=REDIS_CONNECTIONS,
        timeout=POOL_WAIT_SECONDS,
        socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
        socket_timeout=REDIS_TIMEOUT_SECONDS,
    )


async def connect_redis(url: str) -> Redis:
    """A client for the shared store, checked now: a node that cannot share limits must not start."""
    redis = Redis.from_pool(blocking_pool(url))
    try:
        await redis.ping()
    except RedisError as exc:
        await redis.aclose()
        raise RuntimeError(f"Redis at QUBAX_REDIS_URL is unreachable: {exc}") from exc
    return redis


class RedisSlots:
    """Counts shared by every node through one Redis."""

    def __init__(self, redis: Redis, hold_seconds: float, prefix: str = "qubax:slots:") -> None:
        self.redis = redis
        self.hold_seconds = hold_seconds
        self.prefix = prefix
        self.take_script = redis.register_script(TAKE_LEAST_BUSY)
        self.reserve_script = redis.register_script(RESERVE)

    async def take(self, names: Sequence[str], limit: int) -> tuple[str, str] | None:
        token = secrets.token_hex(8)
        keys = [self.prefix + name for name in names]
        try:
            chosen = int(await self.take_script(keys=keys, args=[limit, int(self.hold_seconds * 1000), token]))
        except RedisError as exc:
            raise LimitsUnavailable(exc) from exc
        return (names[chosen - 1], token) if chosen else None

    async def reserve(self, name: str, amount: int) -> tuple[str, int]:
        token = f"{secrets.token_hex(8)}:{amount}"
        try:
            total = await self.reserve_script(keys=[self.prefix + name], args=[int(self.hold_seconds * 1000), token])
        except RedisError as exc:
            raise LimitsUnavailable(exc) from exc
        return token, int(total)

    async def check(self) -> None:
        try:
            await self.redis.ping()
        except RedisError as exc:
            raise LimitsUnavailable(exc) from exc

    async def give_back(self, name: str, token: str) -> None:
        try:
            await self.redis.zrem(self.prefix + name, token)
        except RedisError:
            logger.warning("could not give back a slot of %s; it lapses in %.0fs", name, self.hold_seconds)
