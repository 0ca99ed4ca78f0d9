"""OpenAI wire types, named as OpenAI names them. Nothing here knows about providers or storage."""

from datetime import date
from typing import Annotated, Any, Literal

from fastapi import UploadFile
from pydantic import BaseModel, ConfigDict, Field, SkipValidation, StrictBool, StrictInt, StrictStr, WithJsonSchema


class ImageGenerateRequest(BaseModel):
    """Body of `POST /v1/images/generations`. `null` or absent always means "the model's default".

    Values are checked against the model (`GET /v1/models`), so the schema states types, not ranges."""

    # Strict types: OpenAI answers 400 for `"n": "2"`, and so do we. The example is what /docs offers to send.
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"model": "flux-1.1-pro", "prompt": "a cat in space", "size": "1024x1024"}]},
    )

    model: StrictStr = Field(description="A model id or alias, e.g. `flux-1.1-pro`, `gpt-image-1.5` or `dall-e-3`.")
    prompt: StrictStr = Field(description="What to draw; at most 4000 characters (32000 for GPT image models).")
    n: StrictInt | None = Field(None, description="How many images: 1 to the model's maximum (4 for FLUX).")
    size: StrictStr | None = Field(None, description="`WIDTHxHEIGHT` among the model's sizes, or `auto`.")
    response_format: StrictStr | None = Field(
        None, description="`url` or `b64_json`; the default is `url`, and `b64_json` for GPT image models."
    )
    quality: StrictStr | None = Field(
        None, description="`standard` or `hd` (dall-e-3), `low`, `medium` or `high` (GPT image models), or `auto`."
    )
    style: StrictStr | None = Field(None, description="`vivid` or `natural` (dall-e-3 only).")
    output_format: StrictStr | None = Field(None, description="`png` (the default), `jpeg` or `webp`.")
    output_compression: StrictInt | None = Field(
        None, description="0 to 100, for `jpeg` and `webp` output (GPT image models)."
    )
    background: StrictStr | None = Field(
        None, description="`transparent` (with png or webp), `opaque` or `auto` (GPT image models)."
    )
    moderation: StrictStr | None = Field(None, description="`low` or `auto` (GPT image models).")
    stream: StrictBool | None = Field(
        None, description="`true`: answer with server-sent events, each image as soon as it is ready."
    )
    partial_images: StrictInt | None = Field(
        None, description="0 to 3 partial images per image when streaming (GPT image models make them)."
    )
    user: StrictStr | None = Field(None, description="Accepted and ignored.")
    # FLUX extensions (not OpenAI's): OpenAI clients never send them and see no difference.
    seed: StrictInt | None = Field(None, description="FLUX extension: 0 to 4294967295, for repeatable images.")
    safety_tolerance: StrictInt | None = Field(None, description="FLUX extension: 0 (strict) to 6 (permissive).")
    watermark: StrictBool | None = Field(
        None, description='Seedream extension: `true` marks the image "AI generated" (off by default).'
    )
    steps: StrictInt | None = Field(None, description="FLUX extension (`flux-2-flex`): 1 to 50 inference steps.")
    guidance: float | None = Field(None, description="FLUX extension (`flux-2-flex`): guidance scale, 1.5 to 10.")
    webhook_url: StrictStr | None = Field(
        None, description="Qubax extension, for jobs (`Prefer: respond-async`): told, signed, when the job ends."
    )


UPLOAD_FIELDS: set[str] = {"image", "image_list", "mask"}  # an edit's files, apart from its other fields


class ImageEditRequest(BaseModel):
    """Body of `POST /v1/images/edits`: multipart/form-data as the official SDK sends it (one file as
    `image`, a list as repeated `image[]`; scalars as text parts, left out rather than null)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    image: list[UploadFile] | None = Field(None, description="The image(s) to edit: PNG, JPEG or WebP.")
    image_list: list[UploadFile] | None = Field(None, alias="image[]", description="The same, as the SDK sends a list.")
    mask: UploadFile | None = Field(
        None, description="A PNG the size of the first image; its transparent areas are the ones edited."
    )
    prompt: str = Field(description="What to change; at most 32000 characters.")
    model: str | None = Field(None, description="A model that edits images; the default is `gpt-image-1.5`.")
    n: int | None = None
    size: str | None = None
    response_format: str | None = None
    quality: str | None = None
    output_format: str | None = None
    output_compression: int | None = None
    background: str | None = None
    input_fidelity: str | None = Field(None, description="`low` (the default) or `high`.")
    stream: bool | None = None
    partial_images: int | None = None
    user: str | None = None
    seed: int | None = None
    safety_tolerance: int | None = None
    watermark: bool | None = None
    steps: int | None = None
    guidance: float | None = None
    webhook_url: str | None = None

    @property
    def images(self) -> list[UploadFile]:
        return [*(self.image or ()), *(self.image_list or ())]


# Base64 text, a string on the wire. Held as bytes when it is an upstream's own, passed through: written
# into the answer as it is (`payload.dumps`), never made into a str on the way. Only our code builds it,
# so it is not validated: pydantic's union would try to decode megabytes of bytes as a str first.
Base64Text = Annotated[str | bytes, SkipValidation, WithJsonSchema({"type": "string"})]


class Image(BaseModel):
    url: str | None = None
    b64_json: Base64Text | None = None
    revised_prompt: str | None = None


class InputTokensDetails(BaseModel):
    text_tokens: int
    image_tokens: int


class OutputTokensDetails(BaseModel):
    image_tokens: int
    text_tokens: int


class Usage(BaseModel):
    """The upstream's token count for a GPT image model's images (OpenAI's `ImageGenUsage`)."""

    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens_details: OutputTokensDetails | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[Image]
    # GPT image models only, as OpenAI answers for them; each only when its value is a concrete one.
    background: str | None = None
    output_format: str | None = None
    quality: str | None = None
    size: str | None = None
    usage: Usage | None = None


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    # As OpenAI's own list carries it: the day the model stops being served, where one is known.
    shutdown_date: date | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


class Error(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: Error


JobStatus = Literal["queued", "in_progress", "succeeded", "failed", "cancelled"]


class ImageJob(BaseModel):
    """A generation or edit sent with `Prefer: respond-async` (a Qubax extension): its state, and once it
    ended, the answer the request would have had (`result`) or its error."""

    id: str
    object: Literal["image.job"] = "image.job"
    status: JobStatus
    created_at: int
    completed_at: int | None
    model: str
    result: ImagesResponse | None = Field(description="What the request would have answered, once succeeded.")
    error: Error | None = Field(description="OpenAI's error object, once failed or cancelled.")


class ImageJobList(BaseModel):
    """Jobs newest first, a page at a time, as OpenAI's lists are."""

    object: Literal["list"] = "list"
    data: list[ImageJob]
    first_id: str | None
    last_id: str | None
    has_more: bool


class HealthStatus(BaseModel):
    status: Literal["ok"]


class ServerInfo(BaseModel):
    """What `GET /` says: what this server is, and where to read on."""

    name: str
    description: str
    api_base: str  # the base URL an OpenAI client needs, relative to this server
    docs: str
    openapi: str


ERROR_DESCRIPTIONS = {
    400: "Invalid input: malformed JSON, a wrong type, a missing or unknown field, a value the model does "
    "not take, or a prompt the upstream's safety system refused (`content_policy_violation`).",
    401: "No API key, or a wrong or revoked one.",
    403: "The image link's signature is wrong.",
    404: "No such model (or none of its upstreams is configured), image or key.",
    410: "The image link has expired.",
    413: "The request body is larger than 1 MiB.",
    429: "The key's rate, images-per-day or concurrency limit (`rate_limit_exceeded`), or its monthly "
    "budget (`insufficient_quota`); see `Retry-After`.",
    500: "A bug on our side; the message names the request id.",
    502: "Every upstream failed, or one failed after accepting the work; `x-should-retry` says whether "
    "sending the request again may help.",
    503: "Every upstream of the model is cooling down, or the database, the image store or the shared limits "
    "store is unreachable or full (the `code` says which); see `Retry-After`.",
    504: "The upstream did not finish within the request deadline.",
}
# OpenAPI entries for each error status: every error has OpenAI's error object as its body.
ERROR_RESPONSES: dict[int, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description} for status, description in ERROR_DESCRIPTIONS.items()
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI entries of the error statuses an endpoint can answer (and 500, which any can)."""
    return {status: ERROR_RESPONSES[status] for status in (*statuses, 500)}


STREAM_DESCRIPTION = (
    "The images, as JSON (`ImagesResponse`), or with `stream: true` as server-sent events: "
    "`image_generation.partial_image` (GPT image models, `partial_images` of them) and "
    "`image_generation.completed` for each image (`image_edit.*` for edits), each event's `data` a JSON "
    "object with `type`, `b64_json`, `created_at`, `size`, `quality`, `background`, `output_format`, and "
    "`partial_image_index` or `usage`; a failure after the stream started is an event whose data is an "
    'OpenAI error object (`{"error": {...}}`).'
)
STREAM_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"description": STREAM_DESCRIPTION, "content": {"text/event-stream": {"schema": {"type": "string"}}}}
}
JOB_RESPONSE: dict[int | str, dict[str, Any]] = {
    202: {
        "model": ImageJob,
        "description": "With the header `Prefer: respond-async`: the request queued as a job, at "
        "`Location: /v1/images/jobs/{id}`, where its `result` appears once it succeeded.",
    }
}
