import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from qubax.errors import LimitsUnavailable
from qubax.limits.shared_slots import RedisSlots, connect_redis
from qubax.limits.slots import LocalSlots, Slots
from tests.redis import fresh_redis

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["local", "redis"])
async def slots(request: pytest.FixtureRequest) -> AsyncIterator[Slots]:
    if request.param == "local":
        yield LocalSlots()
        return
    redis = await connect_redis(fresh_redis(request.getfixturevalue("redis_server")))
    yield RedisSlots(redis, hold_seconds=60)
    await redis.aclose()


async def test_a_name_holds_at_most_its_limit(slots: Slots) -> None:
    first, second = await slots.take(["k"], 2), await slots.take(["k"], 2)
    assert (first is not None and second is not None and first != second) or isinstance(slots, LocalSlots)
    assert await slots.take(["k"], 2) is None
    assert first is not None
    await slots.give_back(*first)
    assert await slots.take(["k"], 2) is not None


async def test_the_least_busy_name_is_taken(slots: Slots) -> None:
    taken = [await slots.take(["a", "b"], 2) for _ in range(4)]
    assert sorted(name for name, _ in filter(None, taken)) == ["a", "a", "b", "b"]
    assert await slots.take(["a", "b"], 2) is None


async def test_names_do_not_share_slots(slots: Slots) -> None:
    assert await slots.take(["a"], 1) is not None
    assert await slots.take(["b"], 1) is not None


async def test_two_nodes_share_one_count(redis_server: str) -> None:
    url = fresh_redis(redis_server)
    first, second = await connect_redis(url), await connect_redis(url)
    node_a, node_b = RedisSlots(first, 60), RedisSlots(second, 60)
    try:
        held = [await node.take(["k"], 3) for node in (node_a, node_b, node_a)]
        assert all(held)
        assert await node_b.take(["k"], 3) is None
        assert held[0] is not None
        await node_b.give_back(*held[0])  # any node may give back any holder's slot by its token
        assert await node_b.take(["k"], 3) is not None
    finally:
        await first.aclose()
        await second.aclose()


async def test_a_dead_holders_slot_lapses(redis_server: str) -> None:
    redis = await connect_redis(fresh_redis(redis_server))
    try:
        slots = RedisSlots(redis, hold_seconds=0.2)
        assert await slots.take(["k"], 1) is not None  # never given back, as if its node died
        assert await slots.take(["k"], 1) is None
        await asyncio.sleep(0.3)
        assert await slots.take(["k"], 1) is not None
    finally:
        await redis.aclose()


async def test_an_unreachable_store_refuses_with_a_503() -> None:
    redis = Redis.from_url("redis://127.0.0.1:9/0", socket_connect_timeout=1)
    try:
        with pytest.raises(LimitsUnavailable) as caught:
            await RedisSlots(redis, 60).take(["k"], 1)
        assert caught.value.status_code == 503
    finally:
        await redis.aclose()


async def test_a_node_without_its_redis_does_not_start() -> None:
    with pytest.raises(RuntimeError, match="unreachable"):
        await connect_redis("redis://127.0.0.1:9/0")


async def test_reservations_add_up_until_given_back(slots: Slots) -> None:
    first, total = await slots.reserve("spend", 40_000)
    assert total == 40_000
    _, total = await slots.reserve("spend", 3_000)
    assert total == 43_000
    await slots.give_back("spend", first)
    _, total = await slots.reserve("spend", 1)
    assert total == 3_001
    assert (await slots.reserve("other", 5))[1] == 5


async def test_a_dead_holders_reservation_lapses(redis_server: str) -> None:
    redis = await connect_redis(fresh_redis(redis_server))
    try:
        slots = RedisSlots(redis, hold_seconds=0.2)
        await slots.reserve("images", 3)  # never given back, as if its node died
        await asyncio.sleep(0.3)
        assert (await slots.reserve("images", 1))[1] == 1
    finally:
        await redis.aclose()
