"""Async jobs: a generation or edit sent with `Prefer: respond-async` (RFC 7240) is checked and admitted
at once, answered `202` with a job, and made later by any node's runner (`runner`).

A job holds, from submission until it ends, the images and the money it may cost against its key's
daily and monthly limits (`queries.charged` counts them), so a burst of jobs cannot overspend. Jobs are
visible to the key that made them only: to any other they do not exist.
"""

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Sequence

import orjson
from fastapi import UploadFile
from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from qubax.background.webhook_targets import check_target
from qubax.errors import InvalidRequest, NotFound, QubaxError
from qubax.pipeline.parsing import check_edit
from qubax.pipeline.work import Work
from qubax.protocol import (
    Error,
    ImageEditRequest,
    ImageGenerateRequest,
    ImageJob,
    ImageJobList,
    ImagesResponse,
)
from qubax.records import queries, tables
from qubax.records.storage import Storage, relink
from qubax.routing.request import ImageRequest
from qubax.server.services import Services

logger = logging.getLogger("qubax")
JOBS_PATH = "/v1/images/jobs"
PREFER_ASYNC = re.compile(r"(?:^|,)\s*respond-async\s*(?:[,;]|$)", re.IGNORECASE)
ENDED = ("succeeded", "failed", "cancelled")
STATUSES = (*queries.PENDING, *ENDED)
MAX_PAGE = 100
CANCEL_WAIT_SECONDS = 10.0  # how long a cancel waits for the running job to stop, before answering
CANCELLED = Error(message="The job was cancelled.", type="invalid_request_error", param=None, code="cancelled")


def wants_async(prefer: str | None) -> bool:
    """Whether a `Prefer` header asks for `respond-async`."""
    return prefer is not None and PREFER_ASYNC.search(prefer) is not None


async def submit(work: Work, services: Services) -> tables.ImageJob:
    """Queue a checked request as a job, once the key's limits admit it (they count it from now)."""
    key, request = work.key, work.request
    webhook_url = await webhook_target(services, key, work.body.webhook_url if work.body is not None else None)
    job = tables.ImageJob(
        id=tables.new_id("job"),
        key_id=key.id,
        endpoint=work.endpoint,
        model=request.model.id,
        fields=orjson.dumps(work.fields()).decode(),
        public_url=work.public_url,
        status="queued",
        reserved_images=request.n,
        reserved_micros=request.cost_micros(request.n, key.test),
        cancel_requested=False,
        created_at=tables.now(),
        webhook_url=webhook_url,
    )
    # The limits count the job while they admit it; its row holds its reservation once it is written.
    async with services.quotas.hold(key, request, concurrent=False):
        inputs = await keep_inputs(services.storage, request, job.id)
        try:
            async with services.sessions() as session:
                session.add(job)
                await session.flush()  # the job before its inputs: the inputs refer to it
                session.add_all(inputs)
                await session.commit()
        except BaseException:
            await asyncio.shield(drop_files(services.storage, [row.stored for row in inputs]))
            raise
    services.job_posted.set()
    return job


async def keep_inputs(storage: Storage, request: ImageRequest, job_id: str) -> list[tables.JobInput]:
    """An edit's files, as checked, copied into the image storage (the job may run on another node),
    and the rows that name them."""
    files = [("image", image) for image in request.images] + ([("mask", request.mask)] if request.mask else [])
    rows: list[tables.JobInput] = []
    try:
        for position, (field, image) in enumerate(files):
            stored = await storage.put_file(image.rewind(), image.format, job_id)
            rows.append(
                tables.JobInput(job_id=job_id, position=position, field=field, filename=image.filename, stored=stored)
            )
    except BaseException:
        await asyncio.shield(drop_files(storage, [row.stored for row in rows]))
        raise
    return rows


async def drop_files(storage: Storage, names: list[str]) -> None:
    """Delete a job's stored uploads. Should that fail, they go when the job is forgotten (`Storage.sweep`)."""
    try:
        await storage.delete(names)
    except (OSError, QubaxError) as exc:
        logger.warning("could not delete a job's uploaded files %s: %s", names, exc)


async def webhook_target(services: Services, key: tables.KeyRecord, asked: str | None) -> str | None:
    """Where the job will report: the URL it names, or else its key's default; checked, and only for a
    key with a signing secret (its receiver could not tell our webhooks from forgeries otherwise)."""
    async with services.sessions() as session:
        row = await session.get(tables.ApiKey, key.id)
    url = asked or (row.webhook_url if row is not None else None)
    if url is None:
        return None
    if row is None or not row.webhook_secret:
        raise InvalidRequest(
            "This key has no webhook signing secret yet: the operator makes one (`qubax keys webhook KEY "
            "--rotate-secret`, or the admin API) and gives it to you, to check our signatures with.",
            param="webhook_url",
            code="webhook_secret_missing",
        )
    return await check_target(url, services.settings.webhook_allowed_hosts)


@contextlib.asynccontextmanager
async def rebuilt(services: Services, job: tables.ImageJob) -> AsyncIterator[ImageRequest]:
    """The job's request as it was sent, checked again (the catalog may have changed since); an edit's
    files open from the image storage while it is used."""
    fields = orjson.loads(job.fields)
    if job.endpoint.endswith("/generations"):
        yield services.catalog.check(ImageGenerateRequest.model_validate(fields))
        return
    async with services.sessions() as session:
        query = select(tables.JobInput).where(tables.JobInput.job_id == job.id).order_by(tables.JobInput.position)
        inputs = list(await session.scalars(query))
    with contextlib.ExitStack() as files:
        uploads = []
        for row in inputs:
            try:
                file = files.enter_context(await services.storage.open_file(row.stored))
            except NotFound as exc:
                raise QubaxError(f"The job's uploaded file {row.filename!r} is gone from the image storage.") from exc
            uploads.append((row.field, UploadFile(file, filename=row.filename)))
        images = [upload for field, upload in uploads if field == "image"]
        mask = next((upload for field, upload in uploads if field == "mask"), None)
        yield await check_edit(ImageEditRequest.model_validate(fields | {"image": images, "mask": mask}), services)


async def find(services: Services, key: tables.KeyRecord, job_id: str) -> tables.ImageJob:
    async with services.sessions() as session:
        job = await session.get(tables.ImageJob, job_id)
    if job is None or job.key_id != key.id:
        raise no_such_job(job_id)
    return job


def no_such_job(job_id: str) -> NotFound:
    return NotFound(f"No job found with id '{job_id}'.", param="job_id")


async def page(
    services: Services, key: tables.KeyRecord, limit: int, after: str | None
) -> tuple[list[tables.ImageJob], bool]:
    """The key's jobs newest first, from the one after `after`, and whether more follow."""
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidRequest(f"limit must be between 1 and {MAX_PAGE}; got {limit}.", param="limit")
    query = select(tables.ImageJob).where(tables.ImageJob.key_id == key.id)
    if after is not None:
        query = query.where(tables.ImageJob.id < after)
    async with services.sessions() as session:
        jobs = list(await session.scalars(query.order_by(tables.ImageJob.id.desc()).limit(limit + 1)))
    return jobs[:limit], len(jobs) > limit


async def cancel(services: Services, key: tables.KeyRecord, job_id: str) -> tables.ImageJob:
    if (await find(services, key, job_id)).status == "queued":
        services.metrics.jobs.inc(("cancelled",))  # no runner ends it
    return await stop(services.sessions, job_id, services.storage)


async def stop(sessions: async_sessionmaker[AsyncSession], job_id: str, storage: Storage) -> tables.ImageJob:
    """Cancel a job: at once if it is still queued; if it runs, its runner (on any node) stops it, and
    the upstream work it owns, within a second or so, which this waits for. An ended job stays as it
    ended. Raises `NotFound` for no such job."""
    async with sessions() as session:
        files = await close(session, job_id, "cancelled", error=CANCELLED.model_dump_json(), was="queued")
        if files is None:
            running = (tables.ImageJob.id == job_id) & (tables.ImageJob.status == "in_progress")
            await session.execute(update(tables.ImageJob).where(running).values(cancel_requested=True))
        await session.commit()
    await drop_files(storage, files or [])
    deadline = time.monotonic() + CANCEL_WAIT_SECONDS
    while True:
        async with sessions() as session:
            job = await session.get(tables.ImageJob, job_id)
        if job is None:
            raise no_such_job(job_id)
        if job.status in ENDED or time.monotonic() > deadline:
            return job
        await asyncio.sleep(0.1)  # its runner may be on another node: the database is all they share


async def close(
    session: AsyncSession,
    job_id: str,
    status: str,
    *,
    result: bytes | None = None,
    error: str | None = None,
    was: str = "in_progress",
) -> list[str] | None:
    """End a job that is still `was`, in the caller's transaction: its outcome kept, its files' rows
    dropped, its webhook (if it has one) queued. Returns the names of its stored files, for the caller
    to `drop_files` once it committed; None when the job was not `was` (it ended already)."""
    ended = await session.execute(
        update(tables.ImageJob)
        .where(tables.ImageJob.id == job_id, tables.ImageJob.status == was)
        .values(status=status, result=result, error=error, completed_at=tables.now(), heartbeat_at=None)
        .returning(tables.ImageJob.key_id, tables.ImageJob.webhook_url)
    )
    row = ended.one_or_none()
    if row is None:
        return None
    dropped = await session.scalars(
        delete(tables.JobInput).where(tables.JobInput.job_id == job_id).returning(tables.JobInput.stored)
    )
    files = list(dropped)
    if row.webhook_url:
        now = tables.now()
        delivery = tables.WebhookDelivery(
            id=tables.new_id("msg"), job_id=job_id, key_id=row.key_id, url=row.webhook_url, status="pending",
            attempts=0, created_at=now, next_attempt_at=now,
        )  # fmt: skip
        session.add(delivery)
    return files


async def describe(services: Services, job: tables.ImageJob, public_url: str) -> ImageJob:
    """The job as its key sees it; links in its result signed anew (the first ones may have expired)."""
    result = None
    if job.result is not None:
        answer = orjson.loads(job.result)
        await relink(answer, services.storage, public_url)
        result = ImagesResponse.model_validate(answer)
    return ImageJob(
        id=job.id,
        status=job.status,
        created_at=tables.unix(job.created_at),
        completed_at=None if job.completed_at is None else tables.unix(job.completed_at),
        model=job.model,
        result=result,
        error=None if job.error is None else Error.model_validate_json(job.error),
    )


def render(job: ImageJob) -> bytes:
    """The job as JSON: every field of the job (null where unset), its result as the request would
    have answered it (without the fields that do not apply)."""
    return orjson.dumps(shown(job))


def shown(job: ImageJob) -> dict[str, object]:
    body = job.model_dump()
    if job.result is not None:
        body["result"] = job.result.model_dump(exclude_none=True)
    return body


async def render_page(services: Services, jobs: Sequence[tables.ImageJob], more: bool, public_url: str) -> bytes:
    data = [await describe(services, job, public_url) for job in jobs]
    page = ImageJobList(
        data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None, has_more=more
    )
    return orjson.dumps(page.model_dump() | {"data": [shown(job) for job in data]})


def failure(error: QubaxError) -> str:
    return error.to_body().error.model_dump_json()
