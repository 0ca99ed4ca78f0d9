"""The one pipeline. A parsed request (`generation.Work`) is admitted by its key's limits, its images
are produced, stored and recorded (`generation.make`), and delivered the way it asked: as an answer,
as a stream of events (`streaming`), or as a job that a runner makes later (`jobs`, `runner`).
Idempotency wraps the pipeline from outside (`idempotency`); routes parse before it and render what it
delivers (an `Answer`)."""

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from qubax.background import jobs
from qubax.pipeline import streaming
from qubax.pipeline.generation import Made, make
from qubax.pipeline.work import Work
from qubax.providers import payload
from qubax.server.services import Services


@dataclass
class Answer:
    """What the pipeline delivers, for the HTTP surface to send: a body, or a stream of events."""

    body: bytes = b""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    events: AsyncIterator[bytes] | None = None
    log: dict[str, object] | None = None  # for the access line: the model, the route, the images


async def run(work: Work, services: Services) -> Answer:
    """The request through the pipeline, delivered as it asked."""
    if work.delivery == "stream":
        return await streamed(work, services)
    if work.delivery == "job":
        return await queued(work, services)
    made, rate_headers = await answered(work, services)
    return answer(work, made, rate_headers)


async def answered(work: Work, services: Services) -> tuple[Made, dict[str, str]]:
    """admit -> make: the images of a request answered at once, and the limits' headers."""
    async with services.quotas.hold(work.key, work.request) as rate_headers:
        made = await make(work, services)
    return made, rate_headers


def answer(work: Work, made: Made, rate_headers: dict[str, str]) -> Answer:
    headers = {"content-type": "application/json", "x-qubax-route": made.upstream, **rate_headers}
    if work.key.test:
        headers["x-qubax-test"] = "true"
    body = payload.dumps(made.response.model_dump(exclude_none=True))
    asked = work.body.model if work.body is not None else work.request.model.id
    log = {"model": asked or "", "route": made.upstream, "images": len(made.response.data)}
    return Answer(body, headers=headers, log=log)


async def streamed(work: Work, services: Services) -> Answer:
    """The events, once the request is admitted (a refusal is raised, as an ordinary error answer)."""
    headers, events = await streaming.open_stream(work, services)
    if work.key.test:
        headers["x-qubax-test"] = "true"
    return Answer(headers=headers, events=events)


async def queued(work: Work, services: Services) -> Answer:
    """The request admitted and queued as a job, answered at once with `202 Accepted`."""
    job = await jobs.submit(work, services)
    body = jobs.render(await jobs.describe(services, job, work.public_url))
    headers = {
        "content-type": "application/json",
        "location": f"{jobs.JOBS_PATH}/{job.id}",
        "preference-applied": "respond-async",
    }
    return Answer(body, 202, headers)
