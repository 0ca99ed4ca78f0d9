"""What travels through the pipeline: a request parsed into the one internal request type, with whose
it is, how it is to be delivered, and the identity its usage is charged as."""

from dataclasses import dataclass
from typing import Any, Literal

from qubax.protocol import UPLOAD_FIELDS, ImageEditRequest, ImageGenerateRequest
from qubax.records import tables
from qubax.routing.request import ImageRequest

# An answer to the request, a stream of server-sent events, or a job that a runner makes later.
Delivery = Literal["answer", "stream", "job"]


@dataclass(frozen=True, kw_only=True)
class Work:
    """A parsed request on its way through the pipeline: what it asks, for whom, and how it is delivered."""

    request: ImageRequest
    key: tables.KeyRecord
    delivery: Delivery = "answer"
    endpoint: str = ""  # the API path it came to
    body: ImageGenerateRequest | ImageEditRequest | None = None  # as sent: a job keeps its fields
    public_url: str = ""  # where image links point ("" for an answer without links)
    job_id: str | None = None  # a job's images are kept as long as the job
    charge_id: str | None = None  # the usage record's id, for work with an identity of its own (`recording`)

    def fields(self) -> dict[str, Any]:
        """The fields sent, without the files: what a job keeps, and what an idempotency key compares."""
        return {} if self.body is None else self.body.model_dump(exclude=UPLOAD_FIELDS, exclude_none=True)
