"""What an upstream's failure means for us: the error its status maps to, its own words for the
operator, and whether another route may still take the work."""

from typing import Any

from qubax.errors import TaskFailed, UpstreamError
from qubax.providers.replies import Reply

DETAIL_CHARS = 500  # of an upstream's own error text kept for the operator


def check_status(response: Reply, provider: str) -> None:
    """Raise the error a non-2xx upstream answer means; adapters handle provider quirks first. The client
    learns the status and whether a retry can help; the state of the operator's account with the
    provider, and the upstream's own words, go to the error's `detail`."""
    status = response.status_code
    if status < 300:
        return
    if status in (401, 403):
        message, diagnosis = "could not serve the request", "the configured credential was rejected: "
    elif status == 402:
        message, diagnosis = "could not serve the request", "the account is out of credit: "
    elif status == 429:
        message, diagnosis = "is over its rate limit", "rate limited: "
    else:
        message, diagnosis = ("failed" if status >= 500 else "refused the request"), ""
    retryable = status == 429 or status >= 500
    # A refused credential or an empty account is this route's problem: another route may still serve.
    failover = retryable or status in (401, 402, 403)
    detail = diagnosis + (error_detail(response) or "(no message)")
    raise UpstreamError(
        f"{provider} {message} ({status}).",
        detail=detail,
        retryable=retryable,
        failover=failover,
        deterministic=status in (400, 422),  # the request itself: sent again, it is refused again
    )


def error_detail(response: Reply) -> str:
    """The upstream's own error message, short, whatever shape its body has."""
    try:
        body = response.json()
    except ValueError:
        return ""
    found: Any = body
    if isinstance(body, dict):
        for key in ("error", "detail", "message", "title"):
            if body.get(key):
                found = body[key]
                break
    if isinstance(found, dict):
        found = found.get("message") or found.get("msg") or found
    if isinstance(found, list) and found and isinstance(found[0], dict):  # FastAPI-style validation errors
        field = ".".join(str(part) for part in found[0].get("loc", [])[1:])
        found = f"{field}: {found[0].get('msg')}" if field else found[0].get("msg", found[0])
    return str(found)[:DETAIL_CHARS]


class billed:  # lower case: used like the function it was, `with billed():`
    """Failures inside come after the upstream accepted (and may bill) the work: no failover for them,
    unless the upstream itself says the task failed. A class rather than `contextlib.contextmanager`,
    whose generator is measurably dearer on the hot path (bench/README.md)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, error: BaseException | None, traceback: object) -> None:
        if isinstance(error, UpstreamError) and not isinstance(error, TaskFailed):
            error.failover = False
