"""Async jobs: `Prefer: respond-async` answers 202 with a job that any node's runner makes later."""

import asyncio
import base64
import io
import json
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any, cast

import httpx
import openai
import pytest
from PIL import Image
from pydantic import SecretStr
from sqlalchemy import update

from qubax.app import create_app
from qubax.background import runner
from qubax.errors import NotFound
from qubax.records import db, journal, queries, tables
from qubax.records.storage import IMAGE_LINK, SignedUrls
from qubax.server.services import open_storage, sweep
from qubax.server.settings import Settings
from tests.conftest import create_key
from tests.fakes.bfl import FakeBFL
from tests.server import serve
from tests.stack import Stack, add, client, rows, running_stack
from tests.test_idempotency import bfl_task_of_a_dead_node, silent_since
from tests.test_quota import limited_key

ASYNC = {"Prefer": "respond-async"}
FOX = {"model": "flux-1.1-pro", "prompt": "a fox", "response_format": "b64_json"}


@pytest.fixture
def stack(settings: Settings) -> Iterator[Stack]:
    with running_stack(settings, providers=("bfl", "fal")) as stack:
        yield stack


def submit(sdk: openai.OpenAI, **fields: Any) -> dict[str, Any]:
    """A generation sent as a job with the SDK: the 202's job object."""
    raw = sdk.images.with_raw_response.generate(**(FOX | fields), extra_headers=ASYNC)
    assert raw.status_code == 202
    job: dict[str, Any] = raw.http_response.json()
    assert raw.headers["location"] == f"/v1/images/jobs/{job['id']}"
    assert raw.headers["preference-applied"] == "respond-async"
    return job


def get(sdk: openai.OpenAI, path: str = "", **params: Any) -> httpx.Response:
    """GET /v1/images/jobs…, as the key of `sdk` (the SDK has no jobs API of its own)."""
    headers = {"authorization": f"Bearer {sdk.api_key}"}
    return httpx.get(f"{sdk.base_url}images/jobs{path}", headers=headers, params=params)


def cancel(sdk: openai.OpenAI, job_id: str) -> httpx.Response:
    headers = {"authorization": f"Bearer {sdk.api_key}"}
    return httpx.post(f"{sdk.base_url}images/jobs/{job_id}/cancel", headers=headers, timeout=30)


def wait_for(sdk: openai.OpenAI, job_id: str, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = get(sdk, f"/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not end: {job}")


def charged(stack: Stack) -> list[tuple[str, int, int]]:
    return [(row.outcome, row.images, row.cost_micros) for row in rows(stack.settings, tables.Generation)]


def test_a_job_is_accepted_at_once_and_succeeds_with_what_the_request_would_answer(stack: Stack) -> None:
    stack.bfl.pending_polls = 20
    job = submit(stack.live)
    assert set(job) == {"id", "object", "status", "created_at", "completed_at", "model", "result", "error"}
    assert (job["object"], job["status"], job["model"], job["result"], job["error"]) == (
        "image.job", "queued", "flux-1.1-pro", None, None
    )  # fmt: skip
    assert job["completed_at"] is None and abs(job["created_at"] - time.time()) < 60
    done = wait_for(stack.live, job["id"])
    assert done["status"] == "succeeded" and done["error"] is None and done["completed_at"] >= done["created_at"]
    result = openai.types.ImagesResponse.model_validate(done["result"])
    Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json or ""))).verify()
    assert set(done["result"]) == {"created", "data"}  # as the synchronous answer: no nulls
    assert len(stack.bfl.submissions) == 1
    assert charged(stack) == [("ok", 1, 40_000)]
    assert rows(stack.settings, tables.JobInput) == []


def test_a_job_s_links_are_signed_when_it_is_read(stack: Stack) -> None:
    job = wait_for(stack.live, submit(stack.live, response_format="url")["id"])
    url = job["result"]["data"][0]["url"]
    assert httpx.get(url).status_code == 200
    time.sleep(1.1)
    assert get(stack.live, f"/{job['id']}").json()["result"]["data"][0]["url"] != url  # a later expiry


def test_an_edit_job_keeps_its_files_until_it_ends(stack: Stack) -> None:
    picture = io.BytesIO()
    Image.new("RGB", (64, 48), "red").save(picture, "PNG")
    raw = stack.live.images.with_raw_response.edit(
        model="flux-kontext-pro",
        image=("red.png", picture.getvalue(), "image/png"),
        prompt="make it blue",
        response_format="b64_json",
        extra_headers=ASYNC,
    )
    assert raw.status_code == 202
    job = wait_for(stack.live, raw.http_response.json()["id"])
    assert job["status"] == "succeeded", job
    [submission] = stack.bfl.submissions
    assert submission["input_image"]  # the stored upload reached the upstream
    assert rows(stack.settings, tables.JobInput) == []


def red_png() -> bytes:
    picture = io.BytesIO()
    Image.new("RGB", (64, 48), "red").save(picture, "PNG")
    return picture.getvalue()


def stored(settings: Settings, name: str) -> bytes | None:
    """A file kept in the image storage (local or S3, as the stack has it); None when it is gone."""

    async def read() -> bytes | None:
        async with open_storage(settings) as storage:
            try:
                with await storage.open_file(name) as file:
                    return await asyncio.to_thread(file.read)
            except NotFound:
                return None

    return asyncio.run(read())


def test_an_edit_job_s_files_live_in_the_image_storage_until_it_ends(stack: Stack) -> None:
    """The job's rows name its files and hold none of their bytes; the files are in the image storage
    while the job waits, and gone when it ends."""
    stack.bfl.pending_polls = 10_000
    raw = stack.live.images.with_raw_response.edit(
        model="flux-kontext-pro", image=("red.png", red_png(), "image/png"), prompt="blue", extra_headers=ASYNC
    )
    job_id = raw.http_response.json()["id"]
    deadline = time.monotonic() + 10
    while not stack.bfl.submissions and time.monotonic() < deadline:
        time.sleep(0.02)
    [row] = rows(stack.settings, tables.JobInput)
    columns = {column.name: getattr(row, column.name) for column in tables.JobInput.__table__.columns}
    assert all(isinstance(value, int | str) and len(str(value)) < 200 for value in columns.values()), columns
    assert (row.job_id, row.field, row.filename) == (job_id, "image", "red.png")
    assert stored(stack.settings, row.stored) == red_png()
    stack.bfl.pending_polls = 0
    assert wait_for(stack.live, job_id)["status"] == "succeeded"
    assert rows(stack.settings, tables.JobInput) == [] and stored(stack.settings, row.stored) is None


def test_a_cancelled_queued_edit_job_s_files_are_deleted(settings: Settings) -> None:
    with running_stack(settings, providers=("bfl",), job_concurrency=1) as stack:
        stack.bfl.pending_polls = 10_000
        first = submit(stack.live)
        image = ("red.png", red_png(), "image/png")
        raw = stack.live.images.with_raw_response.edit(
            model="flux-kontext-pro", image=image, prompt="blue", extra_headers=ASYNC
        )
        [row] = rows(stack.settings, tables.JobInput)
        assert stored(stack.settings, row.stored) == red_png()
        assert cancel(stack.live, raw.http_response.json()["id"]).json()["status"] == "cancelled"
        assert rows(stack.settings, tables.JobInput) == [] and stored(stack.settings, row.stored) is None
        cancel(stack.live, first["id"])


def test_an_edit_job_routed_to_openai_succeeds(settings: Settings) -> None:
    """OpenAI's edits are sent as multipart from a file of their own: the job's files must be real files."""
    with running_stack(settings, providers=("openai",)) as stack:
        raw = stack.live.images.with_raw_response.edit(
            model="gpt-image-2", image=("red.png", red_png(), "image/png"), prompt="blue", extra_headers=ASYNC
        )
        job = wait_for(stack.live, raw.http_response.json()["id"])
        assert job["status"] == "succeeded", job
        [edit] = stack.openai.edits
        assert edit["images"] == [("red.png", "PNG", (64, 48))]


def test_a_failed_job_carries_the_error_and_costs_nothing(stack: Stack) -> None:
    stack.bfl.moderate = "Request Moderated"
    job = wait_for(stack.live, submit(stack.live)["id"])
    assert job["status"] == "failed" and job["result"] is None
    assert job["error"]["code"] == "content_policy_violation"
    assert set(job["error"]) == {"message", "type", "param", "code"}
    assert [cost for _, _, cost in charged(stack)] == [0]


def test_invalid_jobs_are_refused_at_submission(stack: Stack) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        stack.live.images.generate(model="flux-1.1-pro", prompt="a fox", n=9, extra_headers=ASYNC)
    assert caught.value.param == "n"
    with pytest.raises(openai.BadRequestError) as caught:
        stack.live.images.generate(model="flux-1.1-pro", prompt="a fox", stream=True, extra_headers=ASYNC)
    assert caught.value.param == "stream"
    assert rows(stack.settings, tables.ImageJob) == []


def test_the_sdk_that_cannot_read_a_job_is_told_how(stack: Stack) -> None:
    """The SDK's plain images.generate() would take the 202 for images (data=None) and lose the job."""
    with pytest.raises(openai.BadRequestError) as caught:
        stack.live.images.generate(**FOX, extra_headers=ASYNC)  # type: ignore[arg-type]
    assert caught.value.code == "job_needs_raw_response"
    assert "client.images.with_raw_response.generate(...)" in caught.value.message
    assert rows(stack.settings, tables.ImageJob) == []
    raw = stack.live.images.with_raw_response.generate(**FOX, extra_headers=ASYNC)  # type: ignore[arg-type]
    assert raw.status_code == 202 and raw.http_response.json()["object"] == "image.job"


def test_jobs_list_newest_first_a_page_at_a_time(stack: Stack) -> None:
    made = [submit(stack.test)["id"] for _ in range(5)]
    first = get(stack.test, limit=2).json()
    assert first["object"] == "list" and first["has_more"] is True
    assert [job["id"] for job in first["data"]] == made[::-1][:2]
    assert (first["first_id"], first["last_id"]) == (made[4], made[3])
    rest = get(stack.test, limit=10, after=first["last_id"]).json()
    assert [job["id"] for job in rest["data"]] == made[::-1][2:] and rest["has_more"] is False
    assert get(stack.test).json()["data"][0]["id"] == made[4]  # 20 by default
    bad = get(stack.test, limit=0)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "limit"
    assert get(stack.test, limit="many").status_code == 400


def test_a_job_is_visible_to_its_own_key_only(stack: Stack) -> None:
    job = submit(stack.test)
    for response in (get(stack.live, f"/{job['id']}"), cancel(stack.live, job["id"])):
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"
    assert get(stack.live).json()["data"] == []
    assert get(stack.test, f"/{job['id']}").status_code == 200
    assert get(stack.live, "/job_nonexistent").status_code == 404
    assert httpx.get(f"{stack.url}/v1/images/jobs").status_code == 401


def test_cancelling_a_running_job_cancels_its_upstream_work(stack: Stack) -> None:
    stack.fal.running_polls = 10_000
    job = submit(stack.live, model="flux-1-schnell", size="512x512")
    deadline = time.monotonic() + 10
    while not stack.fal.submissions and time.monotonic() < deadline:
        time.sleep(0.02)
    answer = cancel(stack.live, job["id"])
    assert answer.status_code == 200
    cancelled = answer.json()
    assert cancelled["status"] == "cancelled" and cancelled["error"]["code"] == "cancelled"
    assert len(stack.fal.cancels) == 1  # the upstream was told
    assert charged(stack)[0][2] == 0
    assert cancel(stack.live, job["id"]).json()["status"] == "cancelled"  # as it ended


def test_cancelling_a_queued_job_ends_it_at_once(settings: Settings) -> None:
    with running_stack(settings, providers=("bfl",), job_concurrency=1) as stack:
        stack.bfl.pending_polls = 10_000
        first, second = submit(stack.live), submit(stack.live)
        assert cancel(stack.live, second["id"]).json()["status"] == "cancelled"
        assert get(stack.live, f"/{first['id']}").json()["status"] == "in_progress"
        assert cancel(stack.live, first["id"]).json()["status"] == "cancelled"
        assert len(stack.bfl.submissions) == 1  # the queued one never reached the upstream


def test_a_burst_of_jobs_cannot_overspend_the_budget(stack: Stack) -> None:
    """$0.10 a month buys two $0.04 images: the third job is refused at submission, and so is a
    request made while the two jobs still hold their share."""
    stack.bfl.pending_polls = 200
    sdk = limited_key(stack, "--monthly-budget-usd", "0.10")
    jobs = [submit(sdk), submit(sdk)]
    with pytest.raises(openai.RateLimitError) as caught:
        sdk.images.with_raw_response.generate(**FOX, extra_headers=ASYNC)  # type: ignore[arg-type]
    assert caught.value.code == "insufficient_quota"
    with pytest.raises(openai.RateLimitError):
        sdk.images.generate(**FOX)  # type: ignore[arg-type]
    assert [wait_for(sdk, job["id"])["status"] for job in jobs] == ["succeeded"] * 2
    assert sum(cost for _, _, cost in charged(stack)) == 80_000


def test_daily_images_are_held_by_jobs_in_the_queue(stack: Stack) -> None:
    stack.bfl.pending_polls = 200
    sdk = limited_key(stack, "--images-per-day", "3")
    submit(sdk, n=2)
    with pytest.raises(openai.RateLimitError) as caught:
        sdk.images.with_raw_response.generate(**FOX, n=2, extra_headers=ASYNC)  # type: ignore[arg-type]
    assert caught.value.code == "rate_limit_exceeded"
    submit(sdk)  # one more fits


def test_the_same_idempotency_key_answers_the_same_job(stack: Stack) -> None:
    headers = ASYNC | {"Idempotency-Key": "job-1"}
    first = stack.live.images.with_raw_response.generate(**FOX, extra_headers=headers)  # type: ignore[arg-type]
    again = stack.live.images.with_raw_response.generate(**FOX, extra_headers=headers)  # type: ignore[arg-type]
    assert again.status_code == 202 and again.headers["x-qubax-idempotent-replayed"] == "true"
    assert again.http_response.json()["id"] == first.http_response.json()["id"]
    assert len(rows(stack.settings, tables.ImageJob)) == 1


def test_a_job_abandoned_by_a_dead_node_is_finished_on_its_upstream_task(stack: Stack) -> None:
    """A node died while its job waited on a BFL task: the runner takes the job over once its heartbeat
    is stale, and waits on the noted task instead of submitting again."""
    key_id = next(row.id for row in rows(stack.settings, tables.ApiKey) if not row.test)
    task, task_id = bfl_task_of_a_dead_node(stack, journal.job_owner("job_orphan"))
    silent = silent_since(stack)
    job = tables.ImageJob(
        id="job_orphan", key_id=key_id, endpoint="/v1/images/generations", model="flux-1.1-pro",
        fields=json.dumps(FOX), public_url=stack.url, status="in_progress", reserved_images=1,
        reserved_micros=40_000, cancel_requested=False, created_at=silent, heartbeat_at=silent,
    )  # fmt: skip
    add(stack.settings, job, task)
    job = wait_for(stack.live, "job_orphan")
    assert job["status"] == "succeeded"
    assert len(stack.bfl.submissions) == 1 and set(stack.bfl.polls) == {task_id}
    assert charged(stack) == [("ok", 1, 40_000)]
    assert rows(stack.settings, tables.UpstreamTask) == []


def test_a_job_recorded_by_a_node_that_died_before_ending_it_is_charged_once(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The crash window: a node commits the job's usage record, then dies before it marks the job done.
    The node that takes the job over makes it again, and its usage record is the one already written."""
    died: list[str] = []

    async def dies_the_first_time(services: Any, job_id: str, status: str, **outcome: Any) -> None:
        if not died:
            died.append(job_id)
            raise RuntimeError("the node died")  # its heartbeat stops with it: the job stays in progress
        await end(services, job_id, status, **outcome)

    end = runner.end
    monkeypatch.setattr("qubax.background.runner.end", dies_the_first_time)
    with running_stack(settings, providers=("bfl",), takeover_seconds=2.0, job_poll_seconds=0.1) as stack:
        job_id = submit(stack.live)["id"]
        assert wait_for(stack.live, job_id)["status"] == "succeeded"
        assert died == [job_id]
        assert charged(stack) == [("ok", 1, 40_000)]  # one usage row, charged once


def test_jobs_survive_a_restart_of_the_only_node(settings: Settings) -> None:
    """Stopped with one job in progress and one queued: both finish once the node is back."""
    bfl = FakeBFL(pending_polls=10_000)
    settings.job_concurrency = 1
    with serve(bfl.app) as bfl_url:
        settings.base_urls["bfl"], settings.credentials["bfl"] = bfl_url, SecretStr("test-key")
        key = create_key(settings)
        with serve(create_app(settings)) as url:
            sdk = client(url, key)
            ids = [submit(sdk)["id"] for _ in range(2)]
            deadline = time.monotonic() + 10
            while not bfl.submissions and time.monotonic() < deadline:
                time.sleep(0.02)
        assert sorted(row.status for row in rows(settings, tables.ImageJob)) == ["queued", "queued"]
        bfl.pending_polls = 1
        with serve(create_app(settings)) as url:
            assert [wait_for(client(url, key), job_id)["status"] for job_id in ids] == ["succeeded"] * 2
    generations = rows(settings, tables.Generation)
    assert [row.cost_micros for row in generations if row.outcome == "ok"] == [40_000, 40_000]
    assert sum(row.cost_micros for row in generations) == 80_000


def test_jobs_of_a_key_with_a_concurrency_limit_queue_instead_of_failing(stack: Stack) -> None:
    stack.bfl.pending_polls = 50
    sdk = limited_key(stack, "--max-concurrent", "1")
    jobs = [submit(sdk) for _ in range(3)]  # accepted while the first runs
    assert [wait_for(sdk, job["id"])["status"] for job in jobs] == ["succeeded"] * 3
    assert len(stack.bfl.submissions) == 3
    runs = [task for i, task in enumerate(stack.bfl.polls) if i == 0 or stack.bfl.polls[i - 1] != task]
    assert len(runs) == 3  # one task polled at a time: the jobs ran one after another


def test_the_async_sdk_submits_a_job_and_its_idempotent_copy(stack: Stack) -> None:
    async def twice() -> list[Any]:
        async with openai.AsyncOpenAI(api_key=stack.live_key, base_url=stack.url + "/v1", max_retries=0) as sdk:
            headers = ASYNC | {"Idempotency-Key": "async-sdk"}
            return [
                await sdk.images.with_raw_response.generate(**FOX, extra_headers=headers)  # type: ignore[arg-type]
                for _ in range(2)
            ]

    first, again = asyncio.run(twice())
    assert (first.status_code, again.status_code) == (202, 202)
    job_id = first.http_response.json()["id"]
    assert again.http_response.json()["id"] == job_id and again.headers["x-qubax-idempotent-replayed"] == "true"
    assert wait_for(stack.live, job_id)["status"] == "succeeded"
    assert len(stack.bfl.submissions) == 1


def test_a_job_s_images_are_kept_as_long_as_the_job(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that reads its job after the images' TTL still gets images behind its links; they go
    when the job is forgotten. An image made without a job is swept after the TTL, as ever."""
    monkeypatch.setattr("qubax.records.storage.SWEEP_GRACE_SECONDS", 0)
    monkeypatch.setattr("qubax.records.s3.SWEEP_GRACE_SECONDS", 0)
    with running_stack(settings, providers=("bfl",), image_ttl_seconds=2) as stack:
        job_id = submit(stack.test, response_format="url")["id"]
        [kept] = image_names(wait_for(stack.test, job_id)["result"])
        [plain] = image_names(stack.test.images.generate(**(FOX | {"response_format": "url"})).model_dump())
        time.sleep(2.5)  # past the TTL: every link made so far has expired
        assert asyncio.run(sweep_and_look(stack.settings, [kept, plain])) == [True, False]
        url = get(stack.test, f"/{job_id}").json()["result"]["data"][0]["url"]  # signed anew
        assert httpx.get(url).status_code == 200

        async def forget() -> None:
            engine = db.connect(stack.settings.resolved_database_url)
            async with db.sessions(engine)() as session:
                ended = tables.now() - timedelta(days=31)
                await session.execute(
                    update(tables.ImageJob).where(tables.ImageJob.id == job_id).values(completed_at=ended)
                )
                await session.commit()
            await engine.dispose()

        asyncio.run(forget())
        assert asyncio.run(sweep_and_look(stack.settings, [kept])) == [False]
        assert get(stack.test, f"/{job_id}").status_code == 404


def image_names(answer: dict[str, Any]) -> list[tuple[str, str]]:
    """The (id, format) of each image an answer links to."""
    return [(found[1], found[2]) for item in answer["data"] if (found := IMAGE_LINK.search(item["url"]))]


async def sweep_and_look(settings: Settings, images: list[tuple[str, str]]) -> list[bool]:
    """One round of the sweeper, then whether each image is still stored."""
    engine = db.connect(settings.resolved_database_url)
    async with open_storage(settings) as storage:
        await sweep(storage, db.sessions(engine), settings)
        found = []
        for image_id, ext in images:
            expires = int(time.time()) + 60
            signature = cast(SignedUrls, storage).sign(image_id, expires)
            try:
                await storage.open(image_id, ext, str(expires), signature)
            except NotFound:
                found.append(False)
            else:
                found.append(True)
    await engine.dispose()
    return found


def test_jobs_that_ended_long_ago_are_forgotten(stack: Stack) -> None:
    old, recent = submit(stack.test)["id"], submit(stack.test)["id"]
    for job_id in (old, recent):
        wait_for(stack.test, job_id)
    queued = submit(stack.test, n=2)["id"]

    async def age_and_sweep() -> int:
        engine = db.connect(stack.settings.resolved_database_url)
        async with db.sessions(engine)() as session:
            await session.execute(
                update(tables.ImageJob)
                .where(tables.ImageJob.id == old)
                .values(completed_at=tables.now() - timedelta(days=31))
            )
            await session.commit()
            forgotten = await queries.forget_jobs(session, tables.now() - timedelta(days=30))
        await engine.dispose()
        return forgotten

    assert asyncio.run(age_and_sweep()) == 1
    assert get(stack.test, f"/{old}").status_code == 404
    assert get(stack.test, f"/{recent}").status_code == 200 and get(stack.test, f"/{queued}").status_code == 200
