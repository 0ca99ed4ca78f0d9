import asyncio
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from qubax.app import create_app
from qubax.providers.registry import PROVIDERS
from qubax.records import api_keys, db, queries
from qubax.server.settings import Settings
from tests.postgres import create_database, running_postgres
from tests.redis import fresh_redis, running_redis
from tests.s3 import create_bucket, running_moto, s3_environment
from tests.server import serve

T = TypeVar("T")

# Provider credentials and proxies from the developer's shell must never reach tests.
PROVIDER_ENV = {info.credential for info in PROVIDERS.values()}
PROXY_ENV = {"http_proxy", "https_proxy", "all_proxy", "no_proxy", "ws_proxy", "wss_proxy"}


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("QUBAX_") or name in PROVIDER_ENV or name.lower() in PROXY_ENV:
            monkeypatch.delenv(name)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--database",
        choices=("sqlite", "postgresql"),
        default="sqlite",
        help="run the app's tests on this database (postgresql starts a real server)",
    )
    parser.addoption(
        "--redis",
        action="store_true",
        help="share limits through a real redis-server started for the session",
    )
    parser.addoption(
        "--storage",
        choices=("file", "s3"),
        default="file",
        help="store images on local disk, or in S3 (a moto server started for the session)",
    )


# Tests that only make sense on the default stack: (option, its default, marker, why they skip otherwise).
DEFAULT_STACK_ONLY = (
    ("--database", "sqlite", "sqlite_only", "reads the SQLite file itself"),
    ("--storage", "file", "local_storage_only", "needs images on local disk, served by our own links"),
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for option, default, marker, reason in DEFAULT_STACK_ONLY:
        if config.getoption(option) != default:
            skip = pytest.mark.skip(reason=reason)
            for item in items:
                if marker in item.keywords:
                    item.add_marker(skip)


@pytest.fixture(scope="session")
def postgres_url(request: pytest.FixtureRequest) -> Iterator[str | None]:
    if request.config.getoption("--database") != "postgresql":
        yield None
        return
    with running_postgres() as url:
        yield url


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """A real redis-server for the session (tests of the shared limits use it with or without --redis)."""
    with running_redis() as url:
        yield url


@pytest.fixture(scope="session")
def redis_url(request: pytest.FixtureRequest) -> str | None:
    if not request.config.getoption("--redis"):
        return None
    url: str = request.getfixturevalue("redis_server")
    return url


@pytest.fixture(scope="session")
def s3_endpoint(request: pytest.FixtureRequest) -> Iterator[str | None]:
    if request.config.getoption("--storage") != "s3":
        yield None
        return
    with running_moto() as endpoint:
        yield endpoint


@pytest.fixture
def settings(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    postgres_url: str | None,
    redis_url: str | None,
    s3_endpoint: str | None,
) -> Settings:
    """A fresh data folder and a fresh database (SQLite in that folder, or one on the test PostgreSQL);
    with --redis, a fresh Redis database number; with --storage=s3, a fresh bucket."""
    changes: dict[str, Any] = {}
    if postgres_url is not None:
        changes["database_url"] = asyncio.run(create_database(postgres_url, f"t_{uuid.uuid4().hex}"))
    if redis_url is not None:
        changes["redis_url"] = fresh_redis(redis_url)
    if s3_endpoint is not None:
        for name, value in s3_environment(s3_endpoint).items():
            monkeypatch.setenv(name, value)
        changes["storage_url"] = create_bucket(s3_endpoint, f"t-{uuid.uuid4().hex[:20]}")
    return Settings(data_dir=tmp_path / "data", poll_interval_seconds=0.01, sweep_interval_seconds=3600, **changes)


def cli_env(settings: Settings) -> dict[str, str]:
    """The environment a `qubax` command needs to act on the same data as `settings`."""
    env = {"QUBAX_DATA_DIR": str(settings.data_dir)}
    if settings.database_url:
        env["QUBAX_DATABASE_URL"] = settings.database_url
    if settings.redis_url:
        env["QUBAX_REDIS_URL"] = settings.redis_url
    if settings.storage_url:
        env["QUBAX_STORAGE_URL"] = settings.storage_url
    return env


def create_key(settings: Settings, *, test: bool = False, name: str = "") -> str:
    """A real key, created the way `qubax keys create` creates one; returns the secret."""
    new = api_keys.new_key(test=test)

    async def add() -> None:
        engine = db.connect(settings.resolved_database_url)
        await db.migrate(engine)
        async with db.sessions(engine)() as session:
            await queries.add_key(session, name=name, prefix=new.prefix, digest=new.digest, test=test)
        await engine.dispose()

    asyncio.run(add())
    return new.secret


@pytest.fixture
def test_key(settings: Settings) -> str:
    return create_key(settings, test=True, name="test")


@pytest.fixture
def live_key(settings: Settings) -> str:
    return create_key(settings, name="live")


@pytest.fixture
def base_url(settings: Settings) -> Iterator[str]:
    """Our app, started with `settings`, serving real HTTP on loopback."""
    with serve(create_app(settings)) as url:
        yield url


def eventually(check: Callable[[], T], seconds: float = 3.0) -> T:
    """`check()`'s result once it stops raising AssertionError; for effects allowed a short delay
    (key revocation reaches every node within a second or two)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
