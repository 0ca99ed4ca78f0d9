"""The one exception tree. Code raises these; `app.py` renders them as OpenAI error bodies.

    QubaxError                      500 server_error
    ├── InvalidRequest              400 invalid_request_error  (code invalid_value unless given)
    │   ├── UnknownParameter        400 unknown_parameter
    │   ├── ContentPolicyViolation  400 content_policy_violation
    │   └── IdempotencyKeyReused    400 idempotency_key_reused (the same Idempotency-Key, another request)
    ├── AuthenticationError         401 invalid_api_key
    ├── Forbidden                   403
    ├── NotFound                    404
    │   └── ModelNotFound           404 model_not_found
    ├── Gone                        410
    ├── RequestTooLarge             413
    ├── TryLater                    (sends Retry-After; past a minute, x-should-retry: false)
    │   ├── InProgress              409 idempotency_key_in_use (the first request is still at work)
    │   ├── RateLimited             429 rate_limit_exceeded  (a key's own limit)
    │   │   └── QuotaExceeded       429 insufficient_quota   (the key's monthly budget is spent)
    │   └── ServiceUnavailable      503 upstream_unavailable (every route of the model is cooling down)
    │       ├── LimitsUnavailable   503 limits_unavailable   (the shared limits store, Redis, is unreachable)
    │       ├── DatabaseUnavailable 503 database_unavailable (the database cannot be reached or written)
    │       └── StorageUnavailable  503 storage_unavailable  (the image store cannot be reached, or is full)
    ├── ClientDisconnected          499 (nobody reads it: the client is gone)
    └── UpstreamError               502 upstream_error
        ├── TaskFailed              502 upstream_error       (the upstream says the task failed: not billed)
        └── UpstreamTimeout         504 upstream_timeout

An `UpstreamError` speaks to two readers. Its `message` is for the client, in our own words: what
failed and whether a retry can help, never the upstream's text, which may echo the operator's key or
describe the operator's account. Its `detail` is for the operator: the upstream's own words and what we
make of them, masked (`qubax.masking`) before it is logged or stored in the attempts record.

It also says two things about what to do next: `retryable` (worth the *client* sending the
request again: becomes `x-should-retry`) and `failover` (worth trying the *next route* now; false once the
upstream may have accepted, and so billed, the work).

Every error says whether it is `deterministic`: the same request sent again would be refused the same
way, whatever the moment (our 400s, content policy included, and an upstream's 400 or 422 for the request
itself). An `Idempotency-Key` keeps such a refusal and replays it, as it does a success; any other
failure (an upstream unavailable or timing out, a limit, our own 5xx) may pass, and lets go of the key.
"""

from collections.abc import Mapping
from typing import Any

from qubax.protocol import Error, ErrorResponse


class QubaxError(Exception):
    status_code = 500
    type = "server_error"
    code: str | None = None
    deterministic = False  # the same request would meet the same refusal (see the module docstring)

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    @property
    def headers(self) -> dict[str, str]:
        return {}

    def to_body(self) -> ErrorResponse:
        return ErrorResponse(error=Error(message=self.message, type=self.type, param=self.param, code=self.code))


class InvalidRequest(QubaxError):
    status_code = 400
    type = "invalid_request_error"
    code = "invalid_value"
    deterministic = True


class UnknownParameter(InvalidRequest):
    code = "unknown_parameter"


class ContentPolicyViolation(InvalidRequest):
    code = "content_policy_violation"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(
            message
            or "Your request was rejected as a result of our safety system. "
            "Your prompt may contain text that is not allowed by our safety system."
        )


class IdempotencyKeyReused(InvalidRequest):
    code = "idempotency_key_reused"


class AuthenticationError(QubaxError):
    status_code = 401
    type = "invalid_request_error"
    code = "invalid_api_key"

    @property
    def headers(self) -> dict[str, str]:
        return {"x-should-retry": "false"}  # a wrong or revoked key stays so


class Forbidden(QubaxError):
    status_code = 403
    type = "invalid_request_error"


class NotFound(QubaxError):
    status_code = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"

    def __init__(self, message: str) -> None:
        super().__init__(message, param="model")


class Gone(QubaxError):
    status_code = 410
    type = "invalid_request_error"
    code = "expired"


class RequestTooLarge(QubaxError):
    status_code = 413
    type = "invalid_request_error"
    code = "request_too_large"


# The longest wait a client's automatic retry may sit out; a longer Retry-After comes with `x-should-retry: false`.
SOON_SECONDS = 60


class TryLater(QubaxError):
    """Refused for now: says when to come back (`Retry-After`), plus any headers that explain why."""

    def __init__(self, message: str, *, retry_after: float, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.extra_headers = headers or {}

    @property
    def headers(self) -> dict[str, str]:
        headers = {"retry-after": str(max(1, round(self.retry_after))), **self.extra_headers}
        if self.retry_after > SOON_SECONDS:
            # A day's or a month's limit: the SDKs would retry sooner than Retry-After (Python's, past
            # 60 s) or sleep for hours (Node's). Neither can succeed; say so.
            headers["x-should-retry"] = "false"
        return headers


class InProgress(TryLater):
    status_code = 409
    type = "invalid_request_error"
    code = "idempotency_key_in_use"


class RateLimited(TryLater):
    status_code = 429
    type = "requests"
    code = "rate_limit_exceeded"


class QuotaExceeded(RateLimited):
    type = "insufficient_quota"
    code = "insufficient_quota"


class ClientDisconnected(QubaxError):
    status_code = 499
    type = "invalid_request_error"
    code = "client_disconnected"


class ServiceUnavailable(TryLater):
    status_code = 503
    type = "service_unavailable_error"
    code = "upstream_unavailable"


class LimitsUnavailable(ServiceUnavailable):
    """Without the shared limits store no node can tell whether a limit holds: refuse rather than guess."""

    code = "limits_unavailable"

    def __init__(self, cause: Exception) -> None:
        super().__init__(
            f"The shared limits store is unreachable ({type(cause).__name__}); try again shortly.", retry_after=1
        )


# What we tell clients to wait when a part we depend on fails: a database restart or a bucket's hiccup
# takes seconds, and a retry sooner only adds to the load on it.
DEPENDENCY_RETRY_SECONDS = 5


class DatabaseUnavailable(ServiceUnavailable):
    code = "database_unavailable"

    def __init__(self, message: str) -> None:
        super().__init__(message, retry_after=DEPENDENCY_RETRY_SECONDS)


class StorageUnavailable(ServiceUnavailable):
    code = "storage_unavailable"

    def __init__(self, message: str) -> None:
        super().__init__(message, retry_after=DEPENDENCY_RETRY_SECONDS)


class UpstreamError(QubaxError):
    """The provider failed. See the module docstring for `retryable` and `failover`."""

    status_code = 502
    type = "upstream_error"
    code = "upstream_error"

    def __init__(
        self,
        message: str,
        *,
        detail: str = "",
        retryable: bool = False,
        failover: bool | None = None,
        deterministic: bool = False,
    ) -> None:
        super().__init__(message)
        self.detail = detail
        self.retryable = retryable
        self.failover = retryable if failover is None else failover
        self.deterministic = deterministic  # the upstream refused the request itself (its 400 or 422)
        self.images: list[Any] = []  # what a fan-out produced before this failure, to keep

    @property
    def headers(self) -> dict[str, str]:
        return {"x-should-retry": "true" if self.retryable else "false"}


class TaskFailed(UpstreamError):
    """The upstream reports the task failed, so it was not billed: another route may take it."""

    def __init__(self, message: str, *, detail: str = "") -> None:
        super().__init__(message, detail=detail, failover=True)


# An upstream that answers it does not serve the model asked of it: nothing was made.
MODEL_NOT_SERVED = "upstream_model_not_found"


class UpstreamTimeout(UpstreamError):
    status_code = 504
    code = "upstream_timeout"


TYPE_NAMES = {"string_type": "a string", "int_type": "an integer", "int_from_float": "an integer"}
# What the client sent, in JSON's words: callers never wrote a Python type.
JSON_TYPE_NAMES = {
    type(None): "null",
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "an array",
    dict: "an object",
}
# Where pydantic (through FastAPI) says the body as a whole is wrong: not JSON, or not a JSON object.
NOT_AN_OBJECT = ("json_invalid", "model_type", "model_attributes_type", "dict_type")


def invalid_input(detail: Mapping[str, Any]) -> InvalidRequest:
    """One pydantic error (FastAPI's, with its `body`/`query`/`path` location first), said the way
    OpenAI says it, naming the offending field."""
    location = [str(part) for part in detail.get("loc", ())]
    kind = detail.get("type", "")
    if location[:1] == ["body"] and (kind in NOT_AN_OBJECT or (len(location) == 1 and kind == "missing")):
        return InvalidRequest(
            "We could not parse the JSON body of your request. The API expects a JSON object "
            "(with Content-Type: application/json), but what was sent was not one.",
            code="invalid_json",
        )
    field = ".".join(location[1:]) or None
    if kind == "extra_forbidden":
        return UnknownParameter(f"Unknown parameter: '{field}'.", param=field)
    if kind == "missing":
        return InvalidRequest(f"Missing required parameter: '{field}'.", param=field, code="missing_required_parameter")
    given = detail.get("input")
    if kind in ("int_type", "int_from_float") and isinstance(given, float) and abs(given) >= 2**63:
        # An integer too large for 64 bits, which the JSON parser hands over as a float.
        return InvalidRequest(f"Invalid value for '{field}': the number is out of range.", param=field)
    expected = TYPE_NAMES.get(kind)
    if expected is not None:
        got = JSON_TYPE_NAMES.get(type(given), type(given).__name__)
        message = f"Invalid type for '{field}': expected {expected}, but got {got}."
        return InvalidRequest(message, param=field, code="invalid_type")
    return InvalidRequest(f"Invalid value for '{field}': {detail.get('msg', 'invalid')}.", param=field)
