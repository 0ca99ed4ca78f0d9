"""The jobs API: a generation or edit sent with `Prefer: respond-async` becomes a job (`pipeline.queued`),
which its key reads, lists and cancels here."""

from fastapi import APIRouter, Request, Response

from qubax.api.authentication import CurrentKey, public_url
from qubax.api.bodies import LimitedRoute
from qubax.background import jobs
from qubax.errors import InvalidRequest
from qubax.protocol import ImageEditRequest, ImageGenerateRequest, ImageJob, ImageJobList, error_responses
from qubax.records import tables
from qubax.server.services import Services, ServicesDep

JOBS_PATH = jobs.JOBS_PATH
router = APIRouter(route_class=LimitedRoute)


def wants_job(request: Request, body: ImageGenerateRequest | ImageEditRequest) -> bool:
    """Whether the request asks to be a job (`Prefer: respond-async`); `webhook_url` is only for jobs."""
    if jobs.wants_async(request.headers.get("prefer")):
        return True
    if body.webhook_url is not None:
        raise InvalidRequest(
            "webhook_url is for jobs: send it with the header Prefer: respond-async.", param="webhook_url"
        )
    return False


def check_job_reader(request: Request) -> None:
    """Refuse a job to the Python `openai` SDK's plain `images.generate()`/`edit()`: they would read its
    202 as images (`data=None`) and lose the job. Its raw responses (`with_raw_response`, which sends
    `X-Stainless-Raw-Response`) read it; other clients (Node's `.asResponse()`) cannot be told apart."""
    headers = request.headers
    if headers.get("x-stainless-lang") == "python" and "x-stainless-raw-response" not in headers:
        raise InvalidRequest(
            "The openai SDK's images.generate() and images.edit() cannot read a job (a 202 answer): send "
            "Prefer: respond-async with client.images.with_raw_response.generate(...) (or .edit) and read "
            "the job from its .http_response.json().",
            code="job_needs_raw_response",
        )


@router.get(
    JOBS_PATH + "/{job_id}",
    response_model=ImageJob,
    responses=error_responses(401, 404),
    summary="Retrieve image job",
    tags=["Jobs"],
)
async def retrieve_job(job_id: str, request: Request, key: CurrentKey, services: ServicesDep) -> Response:
    """A job sent with `Prefer: respond-async`: its status, and once it ended, its `result` (what the
    request would have answered, links signed anew) or its `error`. Only the key that made it sees it."""
    return await job_answer(request, await jobs.find(services, key, job_id))


@router.get(
    JOBS_PATH,
    response_model=ImageJobList,
    responses=error_responses(400, 401),
    summary="List image jobs",
    tags=["Jobs"],
)
async def list_jobs(
    request: Request, key: CurrentKey, services: ServicesDep, limit: int = 20, after: str | None = None
) -> Response:
    """This key's jobs, newest first: `limit` (1 to 100) at a time, from the one after the job id `after`."""
    found, more = await jobs.page(services, key, limit, after)
    return json_response(await jobs.render_page(services, found, more, public_url(request)))


@router.post(
    JOBS_PATH + "/{job_id}/cancel",
    response_model=ImageJob,
    responses=error_responses(401, 404),
    summary="Cancel image job",
    tags=["Jobs"],
)
async def cancel_job(job_id: str, request: Request, key: CurrentKey, services: ServicesDep) -> Response:
    """Cancel a job: a queued one at once; a running one within a second or so, with the upstream work
    it owns. A job that already ended is answered as it ended."""
    return await job_answer(request, await jobs.cancel(services, key, job_id))


async def job_answer(request: Request, job: tables.ImageJob) -> Response:
    services: Services = request.app.state.services
    return json_response(jobs.render(await jobs.describe(services, job, public_url(request))))


def json_response(content: bytes) -> Response:
    return Response(content, media_type="application/json")
