import asyncio

import pytest

from qubax.providers.pool import KeyPool

pytestmark = pytest.mark.anyio


async def test_the_cap_holds_and_waiting_work_gets_its_turn() -> None:
    pool = KeyPool(["k1"], limit=2)
    active = peak = 0

    async def work() -> str:
        nonlocal active, peak
        async with pool.lease() as key:
            active += 1
            peak = max(peak, active)
            await asyncio.sleep(0.01)
            active -= 1
            return key

    keys = await asyncio.gather(*(work() for _ in range(10)))
    assert keys == ["k1"] * 10
    assert peak == 2
    assert pool.active == {"k1": 0}


async def test_work_spreads_over_the_least_busy_key() -> None:
    pool = KeyPool(["a", "b"], limit=1)
    async with pool.lease() as first, pool.lease() as second:
        assert {first, second} == {"a", "b"}
        assert pool.active == {"a": 1, "b": 1}
        waiting = asyncio.ensure_future(pool.lease().__aenter__())
        await asyncio.sleep(0.01)
        assert not waiting.done()  # both keys are at their cap
    assert await waiting in {"a", "b"}


async def test_a_cancelled_holder_gives_its_slot_back() -> None:
    pool = KeyPool(["k"], limit=1)
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
    assert pool.active == {"k": 0}
    async with asyncio.timeout(1), pool.lease() as key:
        assert key == "k"


async def test_no_limit_means_no_waiting() -> None:
    pool = KeyPool(["k"])
    async with pool.lease(), pool.lease(), pool.lease():
        assert pool.active == {"k": 3}


def test_a_pool_needs_a_key() -> None:
    with pytest.raises(ValueError):
        KeyPool([])
