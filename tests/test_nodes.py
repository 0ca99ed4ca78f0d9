"""Several nodes as separate `qubax serve` processes on the production stack (PostgreSQL, Redis, S3),
the way an operator runs them behind a load balancer; and a node killed in the middle of traffic."""

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from sqlalchemy import func, select

from qubax.records import db, tables
from qubax.records.api_keys import digest_key
from tests.fakes.bfl import FakeBFL
from tests.fakes.openai import FakeOpenAI
from tests.postgres import binaries, create_database, free_port, running_postgres
from tests.redis import fresh_redis, running_redis
from tests.s3 import create_bucket, running_moto, s3_environment
from tests.server import serve
from tests.test_readme import wait_for_health

pytestmark = pytest.mark.slow
QUBAX = Path(sys.executable).parent / "qubax"


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, str]]:
    """PostgreSQL, Redis and S3 for this module's nodes; each test gets a fresh database and bucket."""
    if binaries() is None:
        pytest.skip("PostgreSQL is not installed: apt-get install -y postgresql (scripts/test does)")
    with running_postgres() as postgres, running_redis() as redis, running_moto() as s3:
        yield {"postgres": postgres, "redis": redis, "s3": s3}


@pytest.fixture
def upstream() -> Iterator[tuple[FakeOpenAI, str]]:
    fake = FakeOpenAI()
    with serve(fake.app) as url:
        yield fake, url + "/v1"


@pytest.fixture
def cluster_env(servers: dict[str, str], upstream: tuple[FakeOpenAI, str], tmp_path: Path) -> dict[str, str]:
    """What every node of one cluster shares: database, Redis, bucket, signing secret, upstream."""
    database = asyncio.run(create_database(servers["postgres"], f"t_{uuid.uuid4().hex}"))
    env = {
        **s3_environment(servers["s3"]),
        "QUBAX_DATABASE_URL": database,
        "QUBAX_REDIS_URL": fresh_redis(servers["redis"]),
        "QUBAX_STORAGE_URL": create_bucket(servers["s3"], f"t-{uuid.uuid4().hex[:20]}"),
        "QUBAX_SIGNING_SECRET": uuid.uuid4().hex * 2,
        "OPENAI_API_KEY": "test-key",
        "QUBAX_OPENAI_BASE_URL": upstream[1],
    }
    return env


@contextlib.contextmanager
def node(
    env: dict[str, str], data_dir: Path, *args: str, **extra: str
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """One `qubax serve` process; yields its URL and the process."""
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("QUBAX_", "AWS_", "OPENAI_"))}
    full_env = {**clean, **env, "QUBAX_DATA_DIR": str(data_dir), **extra}
    log = (data_dir.parent / f"node-{port}.log").open("wb")
    command = [str(QUBAX), "serve", "--port", str(port), *args]
    process = subprocess.Popen(command, env=full_env, stdout=log, stderr=log, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(url, process, 30)
        yield url, process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(10)
        log.close()


def new_key(env: dict[str, str], tmp_path: Path, *flags: str) -> str:
    done = subprocess.run(
        [str(QUBAX), "keys", "create", *flags],
        env={**os.environ, **env, "QUBAX_DATA_DIR": str(tmp_path / "cli")},
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip().splitlines()[-1]


def sdk(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url=url + "/v1", max_retries=0)


def statuses(clients: list[openai.OpenAI], count: int) -> list[int]:
    """`count` generations, eight at a time, spread over the clients."""

    def call(i: int) -> int:
        try:
            clients[i % len(clients)].images.generate(model="dall-e-3", prompt="p", response_format="b64_json")
            return 200
        except openai.RateLimitError:
            return 429

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(call, range(count)))


def test_two_nodes_share_one_rate_limit(cluster_env: dict[str, str], tmp_path: Path) -> None:
    with node(cluster_env, tmp_path / "a") as (a, _), node(cluster_env, tmp_path / "b") as (b, _):
        key = new_key(cluster_env, tmp_path, "--rpm", "6")
        answers = statuses([sdk(a, key), sdk(b, key)], 16)
        assert (answers.count(200), answers.count(429)) == (6, 10)


def test_worker_processes_share_one_rate_limit(cluster_env: dict[str, str], tmp_path: Path) -> None:
    with node(cluster_env, tmp_path / "a", "--workers", "2") as (url, process):
        workers = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) >= 2  # two workers (uvicorn may add a helper process)
        key = new_key(cluster_env, tmp_path, "--rpm", "5")
        answers = statuses([sdk(url, key)], 12)
        assert (answers.count(200), answers.count(429)) == (5, 7)


def test_workers_without_redis_are_refused(cluster_env: dict[str, str], tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUBAX_")}
    env["QUBAX_DATA_DIR"] = str(tmp_path / "data")
    done = subprocess.run([str(QUBAX), "serve", "--workers", "2"], env=env, capture_output=True, text=True)
    assert done.returncode == 2
    assert "QUBAX_REDIS_URL" in done.stderr


def test_an_image_url_from_one_node_is_served_by_another(cluster_env: dict[str, str], tmp_path: Path) -> None:
    with node(cluster_env, tmp_path / "b") as (b, _):
        # Node A hands out links through the public address, here node B (a load balancer in real life).
        with node(cluster_env, tmp_path / "a", QUBAX_PUBLIC_URL=b) as (a, _):
            key = new_key(cluster_env, tmp_path)
            url = sdk(a, key).images.generate(model="dall-e-3", prompt="p", response_format="url").data[0].url
        assert url is not None and url.startswith(b + "/images/")
        # Node A is gone; node B serves the image from the shared bucket.
        answer = httpx.get(url)
        assert answer.status_code == 200
        assert answer.headers["content-type"] == "image/png"
        assert answer.content.startswith(b"\x89PNG")


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_a_node_killed_mid_traffic_loses_no_answered_usage(
    database: str, cluster_env: dict[str, str], upstream: tuple[FakeOpenAI, str], tmp_path: Path
) -> None:
    env = dict(cluster_env)
    if database == "sqlite":
        env["QUBAX_DATABASE_URL"] = f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}"
    upstream[0].delay = 0.05  # keeps requests in flight when the node dies
    with node(env, tmp_path / "a") as (url, process):
        key = new_key(env, tmp_path)
        client = httpx.Client(base_url=url, headers={"authorization": f"Bearer {key}"}, timeout=10)
        body = {"model": "dall-e-3", "prompt": "p", "response_format": "b64_json"}

        def call(_: int) -> int:
            try:
                return client.post("/v1/images/generations", json=body).status_code
            except httpx.HTTPError:
                return 0  # the node died under this request

        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(call, i) for i in range(400)]
            while sum(f.done() for f in futures) < 60:
                time.sleep(0.01)
            os.killpg(process.pid, signal.SIGKILL)
            statuses = [f.result() for f in futures]
        answered = statuses.count(200)
    assert answered >= 60 and statuses.count(0) > 0  # some answered, some cut off by the kill
    assert recorded_ok(env["QUBAX_DATABASE_URL"], key) >= answered


def recorded_ok(database_url: str, key: str) -> int:
    async def count() -> int:
        engine = db.connect(database_url)
        async with db.sessions(engine)() as session:
            query_key = select(tables.ApiKey.id).where(tables.ApiKey.digest == digest_key(key))
            key_id = await session.scalar(query_key)
            query = select(func.count()).where(tables.Generation.key_id == key_id, tables.Generation.outcome == "ok")
            total = int(await session.scalar(query) or 0)
        await engine.dispose()
        return total

    return asyncio.run(count())


def test_two_nodes_share_one_upstream_cap(
    cluster_env: dict[str, str], upstream: tuple[FakeOpenAI, str], tmp_path: Path
) -> None:
    catalog = tmp_path / "catalog.toml"
    catalog.write_text("[providers.openai]\nconcurrency = 2\n")
    env = {**cluster_env, "QUBAX_CATALOG": str(catalog)}
    upstream[0].delay = 0.3  # long enough for work to pile up behind the cap
    with node(env, tmp_path / "a") as (a, _), node(env, tmp_path / "b") as (b, _):
        key = new_key(env, tmp_path)
        answers = statuses([sdk(a, key), sdk(b, key)], 8)
    assert answers == [200] * 8  # excess work waited for a slot; none was refused
    assert upstream[0].peak == 2  # one OpenAI key, capped at 2 active calls across both nodes


def test_work_of_a_node_killed_while_it_waits_is_finished_by_another(
    cluster_env: dict[str, str], tmp_path: Path
) -> None:
    """Node A dies (SIGKILL) while it waits on two BFL tasks: an idempotent request's and a job's. The
    request's retry on node B and B's job runner wait on those same tasks: no second submission, one
    charge each, and both images delivered."""
    bfl = FakeBFL(pending_polls=1_000_000)
    with serve(bfl.app) as bfl_url:
        env = {**cluster_env, "BFL_API_KEY": "test-key", "QUBAX_BFL_BASE_URL": bfl_url}
        env |= {"QUBAX_TAKEOVER_SECONDS": "2", "QUBAX_POLL_INTERVAL_SECONDS": "0.05"}
        key = new_key(env, tmp_path)
        body = {"model": "flux-1.1-pro", "prompt": "a fox", "response_format": "b64_json"}
        retry = {"authorization": f"Bearer {key}", "idempotency-key": "order-7"}
        with node(env, tmp_path / "a") as (a, process), ThreadPoolExecutor(1) as pool:
            cut_off = pool.submit(httpx.post, f"{a}/v1/images/generations", json=body, headers=retry, timeout=60)
            job = sdk(a, key).images.with_raw_response.generate(**body, extra_headers={"Prefer": "respond-async"})
            job_id = job.http_response.json()["id"]
            deadline = time.monotonic() + 20
            while len(set(bfl.polls)) < 2 and time.monotonic() < deadline:  # both tasks noted and waited on
                time.sleep(0.05)
            assert len(bfl.submissions) == 2
            os.killpg(process.pid, signal.SIGKILL)
            with pytest.raises(httpx.HTTPError):
                cut_off.result()
        bfl.pending_polls = 0  # the tasks are done now
        with node(env, tmp_path / "b") as (b, _):
            answer = httpx.post(f"{b}/v1/images/generations", json=body, headers=retry, timeout=60)
            assert answer.status_code == 200 and answer.json()["data"][0]["b64_json"]
            client = httpx.Client(base_url=b, headers={"authorization": f"Bearer {key}"})
            deadline = time.monotonic() + 30
            while (done := client.get(f"/v1/images/jobs/{job_id}").json())["status"] != "succeeded":
                assert done["status"] in ("queued", "in_progress") and time.monotonic() < deadline, done
                time.sleep(0.1)
            assert done["result"]["data"][0]["b64_json"]
    assert len(bfl.submissions) == 2  # nothing was submitted twice
    assert charges(env["QUBAX_DATABASE_URL"], key) == [40_000, 40_000]


def charges(database_url: str, key: str) -> list[int]:
    """What each generation of the key cost, those that failed (at no cost) included."""

    async def load() -> list[int]:
        engine = db.connect(database_url)
        async with db.sessions(engine)() as session:
            key_id = await session.scalar(select(tables.ApiKey.id).where(tables.ApiKey.digest == digest_key(key)))
            found = await session.scalars(
                select(tables.Generation.cost_micros).where(tables.Generation.key_id == key_id)
            )
            costs = [cost for cost in found if cost]
        await engine.dispose()
        return costs

    return asyncio.run(load())
