"""The job runner: every node runs one, for as long as the app runs. It takes queued jobs from the
database, and jobs whose node went silent (it died), and makes them, a bounded number at a time.

Taking a job is one conditional update (after `SELECT … FOR UPDATE SKIP LOCKED` on PostgreSQL), so of
several nodes one wins each job. While a job runs, its runner says so every few seconds, and learns
whether its key asked to cancel it. A node that stops cleanly puts its running jobs back in the queue
(their upstream work was cancelled with them); one that dies leaves its upstream tasks in the journal,
and the node that takes the job over waits on them.
"""

import asyncio
import logging
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import ColumnElement, Update, select, update

from qubax.background import jobs, loops
from qubax.background.heartbeats import RUNNING, Heartbeats
from qubax.errors import AuthenticationError, QubaxError
from qubax.pipeline import generation
from qubax.pipeline.work import Work
from qubax.providers import payload
from qubax.providers.registry import credentials
from qubax.records import journal, queries, tables
from qubax.server import traces
from qubax.server.services import Services

logger = logging.getLogger("qubax")
# The jobs a provider without a concurrency cap counts for in a node's default (`capacity`): its own
# upstream is what bounds it, and each running job holds some memory and its share of the heartbeat.
UNCAPPED_JOBS = 100


async def run_forever(services: Services) -> None:
    settings = services.settings
    # Said alive often (four times within the takeover's silence), so that a cancel is seen within a second.
    alive = Heartbeats(services.sessions, min(1.0, settings.takeover_seconds / 4))
    beating = asyncio.create_task(alive.run_forever())
    try:
        await loops.take_and_run(
            lambda room: take(services, room),
            lambda job_id: run(services, job_id, alive),
            services.job_posted,
            settings.job_concurrency or capacity(services),
            settings.job_poll_seconds,
        )
    finally:
        beating.cancel()


def capacity(services: Services) -> int:
    """Jobs a node makes at once unless the operator says: as many as its providers' caps let run at
    once, each cap (the catalog's, per key) times the provider's keys; a provider without a cap counts as
    `UNCAPPED_JOBS`. A lower default would hold the node below the caps the operator configured."""
    caps = services.catalog.concurrency
    return max(
        1,
        sum(caps.get(name, UNCAPPED_JOBS) * len(credentials(services.settings, name)) for name in services.providers),
    )


async def take(services: Services, room: int) -> list[str]:
    """Up to `room` jobs, now this node's: the oldest abandoned ones (their node went silent) first, then
    the oldest queued ones. Two looks rather than one with OR: each is read off an index in order, where
    the OR of both has the database sort every queued job for each look."""
    silent = tables.now() - timedelta(seconds=services.settings.takeover_seconds)
    abandoned = RUNNING & (tables.ImageJob.heartbeat_at < silent)
    taken: list[str] = []
    for takeable in (abandoned, tables.ImageJob.status == "queued"):
        if len(taken) < room:
            candidates = select(tables.ImageJob.id).where(takeable).order_by(tables.ImageJob.id)
            taken += await loops.claim(services.sessions, candidates, taking(takeable), room - len(taken))
    return taken


def taking(takeable: ColumnElement[bool]) -> Callable[[list[str]], Update]:
    """Make jobs this node's, only while they still are `takeable`: of several nodes, one wins each."""

    def take_them(job_ids: list[str]) -> Update:
        return (
            update(tables.ImageJob)
            .where(tables.ImageJob.id.in_(job_ids), takeable)
            .values(status="in_progress", heartbeat_at=tables.now())
            .returning(tables.ImageJob.id)
        )

    return take_them


async def run(services: Services, job_id: str, alive: Heartbeats) -> None:
    """Make one job and record how it ended: a trace of its own (its work's spans inside)."""
    with traces.span("qubax.job") as span:
        if span is not None:
            span.set_attribute("qubax.job_id", job_id)
        await run_traced(services, job_id, alive)


async def run_traced(services: Services, job_id: str, alive: Heartbeats) -> None:
    work = asyncio.create_task(make(services, job_id))
    alive.add(job_id, work)  # said alive with the node's other jobs; cancelled if its key asks
    try:
        result = await work
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():  # this node is stopping: another run starts it afresh
            await asyncio.shield(requeue(services, job_id))
            raise
        await end(services, job_id, "cancelled", error=jobs.CANCELLED.model_dump_json())
    except QubaxError as exc:
        await end(services, job_id, "failed", error=jobs.failure(exc))
    except Exception:
        logger.exception("job %s crashed", job_id)
        await end(services, job_id, "failed", error=jobs.failure(QubaxError(f"The job {job_id} failed on our side.")))
    else:
        await end(services, job_id, "succeeded", result=result)
    finally:
        alive.discard(job_id)


async def make(services: Services, job_id: str) -> bytes:
    """The job's ImagesResponse (JSON), made as the request would have been, its upstream tasks journaled."""
    async with services.sessions() as session:
        job = await session.get(tables.ImageJob, job_id)
        row = None if job is None else await queries.find_key_by(session, key_id=job.key_id)
    if job is None or row is None:
        raise QubaxError(f"The job {job_id} is gone.")
    key = tables.key_record(row)
    if key.revoked_at is not None:
        raise AuthenticationError("The API key that made this job has been revoked.")
    async with (
        jobs.rebuilt(services, job) as request,
        services.quotas.running(key),
        journal.kept(services.sessions, journal.job_owner(job_id)),
    ):
        # Admitted when it was submitted; what was a job's delivery now is its row's result.
        work = Work(request=request, key=key, public_url=job.public_url, job_id=job_id, charge_id=usage_id(job_id))
        made = await generation.make(work, services)
    return payload.dumps(made.response.model_dump(exclude_none=True))


def usage_id(job_id: str) -> str:
    """The id of the job's usage record: the same for every node that makes the job (`tables.new_id`'s form)."""
    return "gen_" + job_id.removeprefix("job_")


async def end(
    services: Services, job_id: str, status: str, *, result: bytes | None = None, error: str | None = None
) -> None:
    async with services.sessions() as session:
        files = await jobs.close(session, job_id, status, result=result, error=error)
        await session.commit()
    await jobs.drop_files(services.storage, files or [])
    services.webhook_posted.set()
    services.metrics.jobs.inc((status,))
    await journal.forget(services.sessions, journal.job_owner(job_id))
    logger.info("job %s %s", job_id, status)


async def requeue(services: Services, job_id: str) -> None:
    await journal.forget(services.sessions, journal.job_owner(job_id))
    async with services.sessions() as session:
        await session.execute(
            update(tables.ImageJob)
            .where(tables.ImageJob.id == job_id, RUNNING)
            .values(status="queued", heartbeat_at=None)
        )
        await session.commit()
