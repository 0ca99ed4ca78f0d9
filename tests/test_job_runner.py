"""The job runner at scale (issue 27 item 4): how many jobs a node makes at once by default, and its
running jobs said alive together."""

import asyncio
import json
import sqlite3
import time
from datetime import timedelta
from types import SimpleNamespace
from typing import Any, cast

import pytest
from pydantic import SecretStr
from sqlalchemy import event

from qubax.background import runner
from qubax.background.heartbeats import Heartbeats
from qubax.records import db, tables
from qubax.server.services import Services
from qubax.server.settings import Settings
from tests.conftest import create_key
from tests.stack import add, rows, running_stack
from tests.test_jobs import submit


def test_a_node_makes_as_many_jobs_at_once_as_its_providers_caps_allow(settings: Settings) -> None:
    """Unset, QUBAX_JOB_CONCURRENCY follows the catalog's caps: 12 jobs all reach BFL at once (its cap is
    12 here), where the old default of 8 held the other 4 in the queue."""
    with running_stack(settings, "[providers.bfl]\nconcurrency = 12\n", providers=("bfl",)) as stack:
        stack.bfl.pending_polls = 10_000  # every task still running when we look
        for _ in range(12):
            submit(stack.live)
        deadline = time.monotonic() + 30
        while len(stack.bfl.submissions) < 12 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(stack.bfl.submissions) == 12


def test_the_default_counts_each_provider_s_cap_times_its_keys() -> None:
    settings = Settings(credentials={"bfl": SecretStr("a,b"), "fal": SecretStr("c"), "google": SecretStr("g")})
    services = SimpleNamespace(
        settings=settings,
        catalog=SimpleNamespace(concurrency={"bfl": 30, "fal": 40}),
        providers={"bfl": None, "fal": None, "google": None},  # google has no cap of its own
    )
    assert runner.capacity(cast(Services, services)) == 30 * 2 + 40 + runner.UNCAPPED_JOBS


def test_one_statement_says_every_running_job_alive_and_cancels_those_asked(settings: Settings) -> None:
    create_key(settings)
    key_id = rows(settings, tables.ApiKey)[0].id
    stale = tables.now() - timedelta(hours=1)

    def job(job_id: str, status: str, cancel: bool = False) -> tables.ImageJob:
        return tables.ImageJob(
            id=job_id, key_id=key_id, endpoint="/v1/images/generations", model="flux-1.1-pro",
            fields=json.dumps({}), public_url="http://x", status=status, reserved_images=1, reserved_micros=0,
            cancel_requested=cancel, created_at=stale, heartbeat_at=stale,
        )  # fmt: skip

    add(settings, job("job_a", "in_progress"), job("job_b", "in_progress"), job("job_c", "in_progress", cancel=True))
    add(settings, job("job_other_node", "in_progress"))
    statements = asyncio.run(beat_once(settings, ["job_a", "job_b", "job_c"]))
    assert statements["updates"] == 1
    assert statements["cancelled"] == ["job_c"] and statements["left"] == ["job_a", "job_b"]
    beats = {row.id: tables.utc(row.heartbeat_at) for row in rows(settings, tables.ImageJob) if row.heartbeat_at}
    assert all(beats[job_id] > stale for job_id in ("job_a", "job_b", "job_c"))
    assert beats["job_other_node"] == stale  # another node's job: not ours to say alive


async def beat_once(settings: Settings, job_ids: list[str]) -> dict[str, Any]:
    """One beat of a node running `job_ids`: the UPDATEs it sent, the works it cancelled, those left."""
    engine = db.connect(settings.resolved_database_url)
    sent: list[str] = []
    event.listen(engine.sync_engine, "before_cursor_execute", lambda *args: sent.append(args[2]))
    alive = Heartbeats(db.sessions(engine), 1.0)
    works = {job_id: asyncio.create_task(asyncio.sleep(60)) for job_id in job_ids}
    for job_id, work in works.items():
        alive.add(job_id, cast("asyncio.Task[bytes]", work))
    await alive.beat()
    await asyncio.sleep(0)  # a cancelled task ends at its next step
    for work in works.values():
        work.cancel()
    await engine.dispose()
    return {
        "updates": sum(statement.lstrip().upper().startswith("UPDATE IMAGE_JOBS") for statement in sent),
        "cancelled": [job_id for job_id, work in works.items() if work.cancelled() and job_id not in alive.works],
        "left": sorted(alive.works),
    }


@pytest.mark.parametrize("room", [1, 2, 10])
def test_abandoned_jobs_are_taken_first_then_the_oldest_queued_read_off_an_index(settings: Settings, room: int) -> None:
    """One by one or several at a time (a look takes as many as the runner has room for)."""
    create_key(settings)
    key_id = rows(settings, tables.ApiKey)[0].id
    stale, fresh = tables.now() - timedelta(hours=1), tables.now()

    def job(job_id: str, status: str, heartbeat: Any = None) -> tables.ImageJob:
        return tables.ImageJob(
            id=job_id, key_id=key_id, endpoint="/v1/images/generations", model="flux-1.1-pro",
            fields=json.dumps({}), public_url="http://x", status=status, reserved_images=1, reserved_micros=0,
            heartbeat_at=heartbeat,
        )  # fmt: skip

    add(settings, job("job_1", "queued"), job("job_2", "queued"), job("job_3", "in_progress", fresh))
    add(settings, job("job_4", "in_progress", stale), job("job_5", "succeeded"))  # job_4's node went silent
    taken, selects = asyncio.run(take_all(settings, room))
    assert [job_id for batch in taken for job_id in batch] == ["job_4", "job_1", "job_2"]  # job_3's node is alive
    assert [len(batch) for batch in taken] == {1: [1, 1, 1], 2: [2, 1], 10: [3]}[room]  # job_5 has ended
    if settings.resolved_database_url.startswith("sqlite"):
        path = settings.resolved_database_url.partition(":///")[2]
        with sqlite3.connect(path) as plain:
            plans = [str(plain.execute(f"EXPLAIN QUERY PLAN {sql}", params).fetchall()) for sql, params in selects]
        assert plans and not [plan for plan in plans if "TEMP B-TREE" in plan]  # no sort of every queued job


async def take_all(settings: Settings, room: int) -> tuple[list[list[str]], list[tuple[str, Any]]]:
    """What `runner.take` takes, `room` at a time, until nothing is left, and the SELECTs it sent."""
    engine = db.connect(settings.resolved_database_url)
    selects: list[tuple[str, Any]] = []

    def note(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            selects.append((statement, parameters))

    event.listen(engine.sync_engine, "before_cursor_execute", note)
    services = cast(Services, SimpleNamespace(settings=settings, sessions=db.sessions(engine)))
    taken = []
    while batch := await runner.take(services, room):
        taken.append(batch)
    await engine.dispose()
    return taken, selects
