"""How much a node lets through at once (issue 24, finding 13): the upstream connection pool has no cap of
its own (the providers' caps bound the calls), the client-connection bound follows the file-descriptor
limit, and a request that waits for a connection or a slot says so in the log and in the metrics."""

import asyncio
import contextlib
import logging
import resource
import secrets
from collections.abc import Iterator

import httpx
import openai
import pytest
from click.testing import CliRunner
from pydantic import SecretStr
from starlette.requests import Request
from starlette.responses import Response

from qubax.app import create_app
from qubax.providers.pool import KeyPool
from qubax.providers.transport import open_session, send
from qubax.server import connection
from qubax.server.cli import main
from qubax.server.settings import Settings
from tests.conftest import cli_env
from tests.fakes.openai import FakeOpenAI
from tests.providers.test_transport import answer, listening, read_request
from tests.server import serve
from tests.stack import running_stack

Wait = tuple[str, str, float]
IN_FLIGHT = 300
PATIENCE = 60.0  # seconds the fake holds a request for the rest to arrive: only a failing run waits it out


class Gathering(FakeOpenAI):
    """Holds every generation until `expected` are in flight at once (or `PATIENCE` passes), counting the
    most that were: one connection each, as HTTP/1.1 carries one request at a time."""

    def __init__(self, expected: int) -> None:
        super().__init__()
        self.expected, self.held, self.most_held = expected, 0, 0
        self.all_in: asyncio.Event | None = None  # made on the fake's own event loop

    async def generate(self, request: Request) -> Response:
        self.all_in = self.all_in or asyncio.Event()
        self.held += 1
        self.most_held = max(self.most_held, self.held)
        if self.held >= self.expected:
            self.all_in.set()
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PATIENCE):
                    await self.all_in.wait()
            return await super().generate(request)
        finally:
            self.held -= 1


@contextlib.contextmanager
def descriptors(needed: int) -> Iterator[None]:
    """Every socket below lives in this one process (client, our app, the fake): raise the limit as
    `qubax serve` does, and skip where the hard limit is too low."""
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    if connection.raise_descriptor_limit() < needed:
        pytest.skip(f"the file-descriptor limit is below {needed}")
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, before)


# A key's own limits, each far above the load: their counts (in Redis on the production stack) must not
# hold the requests back either.
GENEROUS = ("--rpm", "100000", "--images-per-day", "100000", "--max-concurrent", "10000", "--monthly-budget-usd", "1e5")


@pytest.mark.parametrize("limits", [(), GENEROUS], ids=["unlimited-key", "limited-key"])
def test_300_slow_requests_all_reach_the_upstream_at_once_while_its_cap_allows_them(
    settings: Settings, limits: tuple[str, ...]
) -> None:
    fake = Gathering(IN_FLIGHT)
    with descriptors(5 * IN_FLIGHT), serve(fake.app) as upstream:
        settings.credentials["openai"] = SecretStr("test-key")
        settings.base_urls["openai"] = upstream + "/v1"
        catalog = settings.data_dir.parent / "catalog.toml"
        catalog.write_text(f"[providers.openai]\nconcurrency = {IN_FLIGHT}\n")  # the provider's cap allows them
        settings.catalog = catalog
        with running_stack(settings, providers=()) as stack:
            key = stack.live_key
            if limits:
                created = CliRunner().invoke(main, ["keys", "create", *limits], env=cli_env(settings))
                key = created.stdout.strip().splitlines()[-1]

            async def all_at_once() -> list[openai.types.ImagesResponse]:
                client = openai.AsyncOpenAI(api_key=key, base_url=stack.url + "/v1", max_retries=0)
                calls = (client.images.generate(model="dall-e-3", prompt=f"p{i}") for i in range(IN_FLIGHT))
                try:
                    return await asyncio.gather(*calls)
                finally:
                    await client.close()

            responses = asyncio.run(all_at_once())

    assert len(responses) == IN_FLIGHT and all(len(response.data or ()) == 1 for response in responses)
    assert fake.most_held == IN_FLIGHT  # not held back at a pool size of the node's own


@pytest.mark.parametrize("connections", [None, 100])
def test_the_upstream_pool_has_no_cap_of_its_own_unless_the_operator_sets_one(
    settings: Settings, connections: int | None
) -> None:
    settings.credentials["openai"] = SecretStr("test-key")
    settings.upstream_connections = connections
    app = create_app(settings)
    with serve(app):
        assert app.state.services.http.session.connector.limit == (connections or 0)


def test_the_client_connection_bound_follows_the_descriptor_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    # Half of what the reserve leaves: each client connection may hold an upstream connection too.
    assert connection.connection_bound(1_048_576) == (1_048_576 - connection.RESERVED_DESCRIPTORS) // 2
    assert connection.connection_bound(20_000) == 9_872
    assert connection.connection_bound(1024) == 384
    assert connection.connection_bound(256) == 64  # a small limit keeps half for the rest
    assert connection.connection_bound(1) == 1

    connection.configured_limits.cache_clear()
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert connection.configured_limits().max_connections == connection.connection_bound(soft)
    connection.configured_limits.cache_clear()
    monkeypatch.setenv("QUBAX_MAX_CONNECTIONS", "12")  # the operator's setting wins
    assert connection.configured_limits().max_connections == 12
    connection.configured_limits.cache_clear()


def test_the_descriptor_limit_is_raised_to_the_hard_limit() -> None:
    before = soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowered = min(soft, 512)
    if lowered == hard:
        pytest.skip("the hard limit leaves nothing to raise")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
        assert connection.raise_descriptor_limit() == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, before)


@pytest.mark.anyio
async def test_work_that_waits_for_a_slot_says_so(caplog: pytest.LogCaptureFixture) -> None:
    waits: list[Wait] = []
    pool = KeyPool(["k"], limit=1, scope="upstream:bfl", waited=lambda *wait: waits.append(wait))
    with caplog.at_level(logging.INFO, logger="qubax"):
        async with pool.lease():
            second = asyncio.create_task(pool.lease().__aenter__())
            await asyncio.sleep(0.1)  # whenever it runs, the only slot is held
            assert not second.done()
        await second
    assert [(upstream, resource) for upstream, resource, _ in waits] == [("bfl", "slot")]
    assert "bfl: waited" in caplog.text and "for a slot" in caplog.text


@pytest.mark.anyio
async def test_a_request_that_waits_for_a_connection_says_so(caplog: pytest.LogCaptureFixture) -> None:
    waits: list[Wait] = []
    arrived, release = asyncio.Event(), asyncio.Event()

    async def held(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader) is not None:
            arrived.set()
            await release.wait()
            writer.write(answer())
            await writer.drain()

    async with (
        asyncio.timeout(10),
        listening(held) as url,
        open_session(connections=1, waited=lambda *wait: waits.append(wait)) as session,
    ):
        with caplog.at_level(logging.INFO, logger="qubax"):
            # The first takes the only connection before it yields; the second queues behind it.
            both = asyncio.gather(send(session, "fal", "GET", f"{url}/1"), send(session, "fal", "GET", f"{url}/2"))
            await arrived.wait()
            release.set()
            replies = await both

    assert [reply.status_code for reply in replies] == [200, 200]
    assert [(upstream, resource) for upstream, resource, _ in waits] == [("fal", "connection")]
    assert "fal: waited" in caplog.text and "for a connection" in caplog.text


def test_waits_reach_the_metrics(settings: Settings) -> None:
    token = secrets.token_hex(32)
    settings.admin_token = SecretStr(token)
    settings.credentials["openai"] = SecretStr("test-key")
    app = create_app(settings)
    with serve(app) as url:
        services = app.state.services
        assert services.providers["openai"].upstream.pool.waited == services.http.waited
        services.http.waited("openai", "slot", 0.3)  # as the pool and the session report one
        services.http.waited("openai", "connection", 2.0)
        scrape = httpx.get(f"{url}/metrics", headers={"authorization": f"Bearer {token}"}).text
    assert 'qubax_upstream_waits_total{resource="slot",upstream="openai"} 1.0' in scrape
    assert 'qubax_upstream_waits_total{resource="connection",upstream="openai"} 1.0' in scrape
    assert 'qubax_upstream_wait_seconds_bucket{le="0.5",resource="slot",upstream="openai"} 1.0' in scrape
