"""A dependency fails under load: PostgreSQL restarted, Redis stopped, S3 stopped, the disk full. Each
case runs a `qubax serve` node on the real servers (started here, so that they can be broken), keeps a
few dozen requests in flight, breaks the dependency in the middle, then mends it. What docs/operating.md "Several
nodes" promises is checked by counting: every request answered 200 or an OpenAI 503 with `Retry-After`
(never a 500, never a hang), one usage record charged per 200 and none for the rest, and the node
serving again by itself once the dependency is back."""

import asyncio
import collections
import contextlib
import errno
import functools
import shutil
import signal
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from qubax.limits.shared_slots import REDIS_TIMEOUT_SECONDS
from tests.fakes.openai import FakeOpenAI
from tests.postgres import binaries, create_database, postgres_server
from tests.redis import redis_server
from tests.s3 import create_bucket, moto_server, s3_environment
from tests.server import serve
from tests.test_nodes import charges, new_key, node

pytestmark = pytest.mark.slow

PRICE = 40_000  # dall-e-3 at 1024x1024: $0.04, in micros
REQUESTS, IN_FLIGHT = 48, 16
BODY: dict[str, object] = {"model": "dall-e-3", "prompt": "a lighthouse", "response_format": "b64_json"}
ANSWER_SECONDS = 30  # far more than any answer needs: a request still open by then hangs
OUTAGE_SECONDS = 3  # longer than the S3 client's own retry rides out


@dataclass
class Answer:
    status: int  # 0: no answer within ANSWER_SECONDS
    code: str | None = None
    retry_after: str | None = None


@pytest.fixture
def upstream() -> Iterator[tuple[FakeOpenAI, str]]:
    fake = FakeOpenAI()
    fake.delay = 0.1  # keeps requests in flight while the dependency breaks
    with serve(fake.app) as url:
        yield fake, url + "/v1"


def base_env(upstream: tuple[FakeOpenAI, str], database: Path | str) -> dict[str, str]:
    """A node's settings: the upstream, and the database (a SQLite file, or a URL)."""
    return {
        "QUBAX_DATABASE_URL": f"sqlite+aiosqlite:///{database}" if isinstance(database, Path) else database,
        "QUBAX_SIGNING_SECRET": uuid.uuid4().hex * 2,
        "OPENAI_API_KEY": "test-key",
        "QUBAX_OPENAI_BASE_URL": upstream[1],
    }


def call(client: httpx.Client, body: dict[str, object]) -> Answer:
    try:
        answer = client.post("/v1/images/generations", json=body)
    except httpx.TimeoutException:
        return Answer(0)
    if answer.status_code == 200:
        assert answer.json()["data"], answer.text
        return Answer(200)
    error = answer.json()["error"]  # OpenAI's shape, whatever failed
    assert set(error) == {"message", "type", "param", "code"}, answer.text
    return Answer(answer.status_code, error["code"], answer.headers.get("retry-after"))


def under_load(url: str, key: str, fault: Callable[[], None], body: dict[str, object] = BODY) -> list[Answer]:
    """REQUESTS requests, IN_FLIGHT at a time; `fault` runs (breaking and mending a dependency) once a
    quarter of them are answered, while the rest are in flight or still to be sent."""
    headers = {"authorization": f"Bearer {key}"}
    client = httpx.Client(base_url=url, headers=headers, timeout=ANSWER_SECONDS)
    with client, ThreadPoolExecutor(IN_FLIGHT) as pool:
        futures = [pool.submit(call, client, body) for _ in range(REQUESTS)]
        deadline = time.monotonic() + ANSWER_SECONDS
        while sum(f.done() for f in futures) < REQUESTS // 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        fault()
        return [f.result() for f in futures]


def recovers(url: str, key: str, seconds: float = 15, body: dict[str, object] = BODY) -> float:
    """How long after the mend a request succeeds again (fails the test past `seconds`)."""
    began = time.monotonic()
    headers = {"authorization": f"Bearer {key}"}
    with httpx.Client(base_url=url, headers=headers, timeout=ANSWER_SECONDS) as client:
        while (answer := call(client, body)).status != 200:
            assert answer.status == 503 and time.monotonic() - began < seconds, answer
            time.sleep(0.2)
    return time.monotonic() - began


def outage(
    stop: Callable[[], object], start: Callable[[], object], seconds: float = OUTAGE_SECONDS
) -> Callable[[], None]:
    """The fault `under_load` runs: `stop`, `seconds` without the part, `start`."""

    def fault() -> None:
        stop()
        time.sleep(seconds)
        start()

    return fault


def tally(answers: list[Answer]) -> dict[int | str, int]:
    """How many of each status, and of each error code."""
    return dict(collections.Counter(a.status for a in answers) + collections.Counter(a.code for a in answers if a.code))


def assert_clear_failures(answers: list[Answer], *codes: str) -> None:
    """Every answer a 200, or a 503 with one of `codes` that says when to come back; some of each."""
    assert {a.status for a in answers} == {200, 503}, tally(answers)
    refused = [a for a in answers if a.status == 503]
    assert all(a.code in codes and a.retry_after and int(a.retry_after) >= 1 for a in refused), refused


def test_postgresql_restarted_mid_load(upstream: tuple[FakeOpenAI, str], tmp_path: Path) -> None:
    if binaries() is None:
        pytest.skip("PostgreSQL is not installed: apt-get install -y postgresql (scripts/test does)")
    with postgres_server() as postgres:
        env = base_env(upstream, asyncio.run(create_database(postgres.url, "faults")))
        key = new_key(env, tmp_path)
        with node(env, tmp_path / "a") as (url, _):
            answers = under_load(url, key, outage(postgres.stop, postgres.start))
            recovered = recovers(url, key)
        print(f"postgresql restarted: {tally(answers)}, serving again {recovered:.1f}s after it was back")
        assert_clear_failures(answers, "database_unavailable")
        # One charge per answered request (and the one that showed recovery), none for the refused.
        assert charges(env["QUBAX_DATABASE_URL"], key) == [PRICE] * (tally(answers)[200] + 1)


def test_redis_stopped_mid_load(upstream: tuple[FakeOpenAI, str], tmp_path: Path) -> None:
    """Limits fail closed: while Redis is away, a key with limits is refused (503 limits_unavailable)."""
    with redis_server() as redis:
        env = base_env(upstream, tmp_path / "qubax.db") | {"QUBAX_REDIS_URL": redis.url + "/0"}
        key = new_key(env, tmp_path, "--rpm", "100000")  # a limit: every request is counted in Redis
        with node(env, tmp_path / "a") as (url, _):
            answers = under_load(url, key, outage(redis.stop, redis.start))
            recovered = recovers(url, key)
        print(f"redis stopped: {tally(answers)}, serving again {recovered:.1f}s after it was back")
        assert_clear_failures(answers, "limits_unavailable")
        assert charges(env["QUBAX_DATABASE_URL"], key) == [PRICE] * (tally(answers)[200] + 1)


def test_redis_frozen_mid_load(upstream: tuple[FakeOpenAI, str], tmp_path: Path) -> None:
    """A Redis that stops answering without closing its connections (SIGSTOP: a frozen process, or a
    host gone from the network) refuses requests once the client's timeout passes; none hangs."""
    with redis_server() as redis:
        env = base_env(upstream, tmp_path / "qubax.db") | {"QUBAX_REDIS_URL": redis.url + "/0"}
        key = new_key(env, tmp_path, "--rpm", "100000")
        assert redis.process is not None
        process = redis.process
        with node(env, tmp_path / "a") as (url, _):
            freeze, thaw = (functools.partial(process.send_signal, sig) for sig in (signal.SIGSTOP, signal.SIGCONT))
            # Frozen past the client's timeout.
            answers = under_load(url, key, outage(freeze, thaw, REDIS_TIMEOUT_SECONDS + OUTAGE_SECONDS))
            recovered = recovers(url, key)
        print(f"redis frozen: {tally(answers)}, serving again {recovered:.1f}s after it thawed")
        assert_clear_failures(answers, "limits_unavailable")
        assert charges(env["QUBAX_DATABASE_URL"], key) == [PRICE] * (tally(answers)[200] + 1)


def test_s3_stopped_mid_load(upstream: tuple[FakeOpenAI, str], tmp_path: Path) -> None:
    """Images that cannot be stored are not delivered, so not charged: 503 storage_unavailable."""
    with moto_server() as s3:
        env = base_env(upstream, tmp_path / "qubax.db") | s3_environment(s3.endpoint)
        env["QUBAX_STORAGE_URL"] = create_bucket(s3.endpoint, "faults")
        key = new_key(env, tmp_path)
        body = BODY | {"response_format": "url"}
        with node(env, tmp_path / "a") as (url, _):
            answers = under_load(url, key, outage(s3.stop, s3.start), body)
            recovered = recovers(url, key, body=body)
        print(f"s3 stopped: {tally(answers)}, serving again {recovered:.1f}s after it was back")
        assert_clear_failures(answers, "storage_unavailable")
        assert charges(env["QUBAX_DATABASE_URL"], key) == [PRICE] * (tally(answers)[200] + 1)


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` at `path` (we run as root in CI); skips where mounting is not allowed."""
    path.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command here")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill(disk: Path) -> Path:
    """Take every free byte of the disk with one file; returns it."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as file:
        try:
            while True:
                file.write(b"\0" * 65536)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


# What fills up: the disk of the SQLite file (the ledger cannot record), or that of the images.
FULL = {"database": ("b64_json", "database_unavailable"), "images": ("url", "storage_unavailable")}


@pytest.mark.parametrize("full", FULL)
def test_disk_full_mid_load(full: str, upstream: tuple[FakeOpenAI, str], tmp_path: Path) -> None:
    """A disk that fills up: 503, nothing charged for images not delivered, and the database intact."""
    response_format, code = FULL[full]
    with small_disk(tmp_path / "disk", "64m") as disk:
        database = disk / "qubax.db" if full == "database" else tmp_path / "qubax.db"
        env = base_env(upstream, database) | {"QUBAX_STORAGE_URL": (disk / "images").as_uri()}
        key = new_key(env, tmp_path)
        body = BODY | {"response_format": response_format}
        with node(env, tmp_path / "data") as (url, _):
            answers = under_load(url, key, outage(lambda: fill(disk), (disk / "filler").unlink), body)
            recovered = recovers(url, key, body=body)
        print(f"{full} disk full: {tally(answers)}, serving again {recovered:.1f}s after it had room")
        assert_clear_failures(answers, code)
        assert charges(env["QUBAX_DATABASE_URL"], key) == [PRICE] * (tally(answers)[200] + 1)
        with contextlib.closing(sqlite3.connect(database)) as connection:
            assert connection.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
