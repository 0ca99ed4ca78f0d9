"""Callbacks at the adapter: a task's reference is noted in its journal handle, so that a node taking
the task over waits on the callback the task was submitted with (the app's side: test_upstream_callbacks)."""

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from qubax.providers import Upstream, journal
from qubax.providers.bfl import BFL
from qubax.providers.callbacks import Callbacks, open_callbacks, reachable
from qubax.providers.transport import open_session
from tests.fakes.bfl import FakeBFL
from tests.providers import Job, ask
from tests.redis import fresh_redis
from tests.server import serve

pytestmark = pytest.mark.anyio
FOX = Job("flux-pro-1.1", "a fox", 1024, 768, 1)


class Notes:
    """A task journal in memory (`providers.TaskJournal`)."""

    def __init__(self, noted: list[dict[str, Any]] | None = None) -> None:
        self.noted = list(noted or [])
        self.recorded: list[dict[str, Any]] = []

    def take(self, provider: str, model: str, count: int) -> dict[str, Any] | None:
        return self.noted.pop(0) if self.noted else None

    async def record(self, provider: str, model: str, count: int, handle: dict[str, Any]) -> None:
        self.recorded.append(handle)


@pytest.fixture
def fake() -> Iterator[FakeBFL]:
    fake = FakeBFL(callback_delay=3600, drop_callbacks=True)  # the test ends the task, and calls back
    with serve(fake.app) as base_url:
        fake.base_url = base_url
        yield fake


async def until(condition: Any) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the fake never saw it")


async def test_a_task_taken_over_waits_on_the_callback_it_was_submitted_with(fake: FakeBFL) -> None:
    callbacks = Callbacks("https://qubax.example", b"s" * 32, poll_seconds=60)
    async with open_session() as http:
        upstream = Upstream(http, fake.base_url, "test-key", poll_interval=0.01, name="bfl", callbacks=callbacks)
        notes = Notes()
        token = journal.set(notes)
        first = asyncio.create_task(ask(BFL(upstream), FOX))
        journal.reset(token)
        await until(lambda: fake.polls)
        first.cancel()  # the node waiting on it dies
        with contextlib.suppress(asyncio.CancelledError):
            await first
        [handle] = notes.recorded
        assert fake.submissions[0]["webhook_url"] == callbacks.url("bfl", handle["callback"])

        token = journal.set(Notes([handle]))
        second = asyncio.create_task(ask(BFL(upstream), FOX))
        journal.reset(token)
        await until(lambda: len(fake.polls) == 2)
        assert set(callbacks.waiters) == {handle["callback"]}
        fake.end(fake.tasks[0], fake.base_url)
        await callbacks.wake(handle["callback"])
        async with asyncio.timeout(10):  # the slow poll is a minute away: only the wake ends it
            images = await second
    assert len(images) == 1
    assert len(fake.submissions) == 1  # taken over, not submitted again
    assert len(fake.polls) == 3


async def test_a_callback_at_another_node_wakes_only_its_own_waiter(redis_server: str) -> None:
    """Two nodes sharing a real Redis: a callback node B receives wakes the task that waits on node A."""
    url, secret = fresh_redis(redis_server), b"s" * 32
    async with (
        open_callbacks("https://qubax.example", secret, 60, url) as node_a,
        open_callbacks("https://qubax.example", secret, 60, url) as node_b,
    ):
        assert node_a is not None and node_b is not None
        with node_a.waiting("task-1") as first, node_a.waiting("task-2") as second:
            for _ in range(100):  # until node A's subscription is in place: a wake sent before it is lost
                await node_b.wake("task-1")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(first.wait(), 0.1)
                    break
            assert first.is_set()
            assert not second.is_set()
            assert node_b.waiters == {}


@pytest.mark.parametrize(
    ("public_url", "asked", "callbacks"),
    [
        ("https://images.example.com", None, True),
        ("http://203.0.113.7:8000", None, False),  # documentation range: not global
        ("http://8.8.8.8", None, True),
        ("http://[2001:4860::1]:8000", None, True),
        ("http://10.1.2.3", None, False),
        ("http://[::1]:8000", None, False),
        ("http://[::ffff:10.0.0.1]:8000", None, False),  # IPv4-mapped: judged by the address it carries
        ("http://[64:ff9b::a00:1]:8000", None, False),  # NAT64 to 10.0.0.1
        ("http://localhost:8000", None, False),
        ("http://qubax:8000", None, False),  # a name without a dot: inside a network
        ("https://qubax.internal", None, False),
        ("http://127.0.0.1:8000", True, True),  # the operator knows best, both ways
        ("https://images.example.com", False, False),
        (None, True, False),
    ],
)
def test_callbacks_are_asked_for_only_where_an_upstream_could_call(
    public_url: str | None, asked: bool | None, callbacks: bool
) -> None:
    assert (reachable(public_url, asked) is not None) == callbacks
