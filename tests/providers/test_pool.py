import asyncio
from collections.abc import AsyncIterator

import pytest

from qubax.limits.shared_slots import RedisSlots, connect_redis
from qubax.limits.slots import LocalSlots, Slots
from qubax.providers.pool import KeyPool
from tests.redis import fresh_redis

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["local", "redis"])
async def nodes(request: pytest.FixtureRequest) -> AsyncIterator[list[Slots]]:
    """The slots of two nodes: each its own in-process, or both sharing one Redis."""
    if request.param == "local":
        yield [LocalSlots(), LocalSlots()]
        return
    url = fresh_redis(request.getfixturevalue("redis_server"))
    clients = [await connect_redis(url), await connect_redis(url)]
    yield [RedisSlots(client, hold_seconds=60) for client in clients]
    for client in clients:
        await client.aclose()


async def peak_of(pools: list[KeyPool], jobs: int) -> tuple[int, list[str]]:
    active = peak = 0

    async def work(pool: KeyPool) -> str:
        nonlocal active, peak
        async with pool.lease() as key:
            active += 1
            peak = max(peak, active)
            await asyncio.sleep(0.01)
            active -= 1
            return key

    keys = await asyncio.gather(*(work(pools[i % len(pools)]) for i in range(jobs)))
    return peak, keys


async def test_the_cap_holds_and_waiting_work_gets_its_turn(nodes: list[Slots]) -> None:
    peak, keys = await peak_of([KeyPool(["k1"], limit=2, slots=nodes[0])], 10)
    assert keys == ["k1"] * 10
    assert peak == 2


async def test_two_nodes_share_the_cap(nodes: list[Slots]) -> None:
    pools = [KeyPool(["k1"], limit=2, slots=slots, scope="bfl") for slots in nodes]
    peak, _ = await peak_of(pools, 12)
    # In-process slots are per node: each may use the whole cap. Shared slots hold it across both.
    assert peak == (4 if isinstance(nodes[0], LocalSlots) else 2)


async def test_work_spreads_over_the_least_busy_key(nodes: list[Slots]) -> None:
    pool = KeyPool(["a", "b"], limit=1, slots=nodes[0])
    async with pool.lease() as first, pool.lease() as second:
        assert {first, second} == {"a", "b"}
        waiting = asyncio.ensure_future(pool.lease().__aenter__())
        await asyncio.sleep(0.1)
        assert not waiting.done()  # both keys are at their cap
    assert await waiting in {"a", "b"}


async def test_a_cancelled_holder_gives_its_slot_back(nodes: list[Slots]) -> None:
    pool = KeyPool(["k"], limit=1, slots=nodes[0])
    entered = asyncio.Event()

    async def hold() -> None:
        async with pool.lease():
            entered.set()
            await asyncio.sleep(60)

    holder = asyncio.ensure_future(hold())
    await entered.wait()
    holder.cancel()
    with pytest.raises(asyncio.CancelledError):
        await holder
    async with asyncio.timeout(1), pool.lease() as key:
        assert key == "k"


async def test_no_limit_means_no_waiting() -> None:
    pool = KeyPool(["k"])
    async with asyncio.timeout(1), pool.lease(), pool.lease(), pool.lease():
        pass


def test_slot_names_never_carry_the_credential() -> None:
    pool = KeyPool(["secret-credential"], limit=1, scope="upstream:bfl")
    assert all("secret" not in name and name.startswith("upstream:bfl:") for name in pool.credentials)


def test_a_pool_needs_a_key() -> None:
    with pytest.raises(ValueError):
        KeyPool([])
