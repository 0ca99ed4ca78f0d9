"""A fake OpenAI Images API serving dall-e-3 and the GPT image models, written from OpenAI's public API
reference.

`POST /v1/images/generations` with `Authorization: Bearer <key>`; dall-e-3 takes only `n=1` and the
sizes 1024x1024, 1792x1024, 1024x1792; answers `{"created", "data": [{"b64_json"|"url", "revised_prompt"}]}`
and errors as `{"error": {"message", "type", "param", "code"}}`. Result URLs are served under `/files/`.

The GPT image models (gpt-image-1.5, gpt-image-1-mini, gpt-image-2, gpt-image-1) take `n` 1-10, `quality`
low/medium/high/auto, `background`, `moderation`, `output_format`, `output_compression`, refuse
`response_format` and `style` as unknown parameters, and answer base64 images with the resolved
`background`, `quality`, `size`, `output_format` and a `usage` token count. With `stream: true` they answer
`text/event-stream`: `partial_images` `image_generation.partial_image` events (`image_edit.*` for edits),
then an `image_generation.completed` event with the image and its `usage`.

By default it is a compatible host that still serves the models OpenAI has shut down; with `retired` set
it answers them 404 `model_not_found`, as OpenAI's own API does. `GET /v1/models` lists its models as
OpenAI's list does, each with the optional `shutdown_date` (YYYY-MM-DD, or null when none is announced;
`shutdown_dates`, from OpenAI's deprecations page).
"""

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from PIL import Image, UnidentifiedImageError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.fakes import ImagesFake

SIZES = ("1024x1024", "1792x1024", "1024x1792")
GPT_MODELS = (
    "gpt-image-1.5",
    "gpt-image-1-mini",
    "gpt-image-2",
    "gpt-image-1",
    "gpt-image-2.6-sunburst",
    "gpt-image-2.6-flare",
)
GPT_SIZES = ("1024x1024", "1536x1024", "1024x1536", "auto")
# What OpenAI's own API has shut down and answers 404 model_not_found (its deprecations page): dall-e-3 on
# 2026-05-12, gpt-image-1 on 2026-10-23, the rest on 2026-12-01.
RETIRED = (
    "dall-e-3",
    "gpt-image-1",
    "gpt-image-1.5",
    "gpt-image-1.5-2025-12-16",
    "gpt-image-1-mini",
    "chatgpt-image-latest",
)
# The shutdown dates OpenAI's deprecations page gives these models (and its model list publishes).
SHUTDOWN_DATES = {
    "dall-e-2": "2026-05-12",
    "dall-e-3": "2026-05-12",
    "gpt-image-1": "2026-10-23",
    "gpt-image-1.5": "2026-12-01",
    "gpt-image-1.5-2025-12-16": "2026-12-01",
    "gpt-image-1-mini": "2026-12-01",
    "chatgpt-image-latest": "2026-12-01",
}
FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
# Image tokens OpenAI documents for one output image, at 1024x1024 and at the larger standard sizes.
OUTPUT_TOKENS = {"low": (272, 408), "medium": (1056, 1584), "high": (4160, 6240)}
SAFETY_MESSAGE = (
    "Your request was rejected as a result of our safety system. "
    "Your prompt may contain text that is not allowed by our safety system."
)


class FakeOpenAI(ImagesFake):
    def __init__(self, api_key: str = "test-key") -> None:
        super().__init__(api_key)
        self.moderate: str | None = None  # error code for a 400 safety refusal, e.g. content_policy_violation
        self.retired = False  # answer RETIRED models 404 model_not_found, as OpenAI's own API does today
        self.out_of_credit = False  # 429 insufficient_quota
        self.image_format = "PNG"  # the Pillow format images are encoded in
        self.empty = False  # answer 200 with no images
        self.drop_usage = False  # answer GPT image models without a `usage` token count
        self.edits: list[dict[str, Any]] = []  # every edit: its text fields, and (filename, format, size) per file
        self.stream_error_after: int | None = None  # a streamed answer sends an error event after this many partials
        self.event_delay = 0.0  # seconds between streamed events
        self.extra_partials = 0  # a streamed answer sends this many partial images more than asked
        self.streams_closed = 0  # streamed answers that ended early: the client went away
        self.shutdown_dates = dict(SHUTDOWN_DATES)  # what `GET /v1/models` publishes
        self.model_lists = 0  # `GET /v1/models` calls answered
        self.app.router.routes.append(Route("/v1/images/edits", self.edit, methods=["POST"]))
        self.app.router.routes.append(Route("/v1/models", self.list_models))

    def unauthorized(self) -> Response:
        return error(401, "Incorrect API key provided: test-***.", "invalid_api_key")

    async def list_models(self, request: Request) -> Response:
        """`GET /v1/models`: `{"object": "list", "data": [{"id", "object", "created", "owned_by",
        "shutdown_date"}]}`; the retired models only while it still serves them."""
        if request.headers.get("authorization") != f"Bearer {self.api_key}":
            return self.unauthorized()
        if self.fail_status is not None:
            return error(self.fail_status, f"fake failure {self.fail_status}", None, "server_error")
        self.model_lists += 1
        served = [name for name in ("dall-e-3", *GPT_MODELS) if not (self.retired and name in RETIRED)]
        listed = [
            {"id": name, "object": "model", "created": 1698785189, "owned_by": "system"}
            | {"shutdown_date": self.shutdown_dates.get(name)}
            for name in served
        ]
        return JSONResponse({"object": "list", "data": listed})

    def answer(self, request: Request, body: dict[str, Any]) -> Response:
        if refusal := self.refusal(body):
            return refusal
        if body["model"] in GPT_MODELS:
            return self.gpt_answer(body)
        if problem := invalid(body):
            return error(400, *problem)
        if self.moderate:
            return error(400, SAFETY_MESSAGE, self.moderate)
        width, height = (int(side) for side in body.get("size", "1024x1024").split("x"))
        data = [] if self.empty else [self.image(width, height, self.image_format)]
        revised = f"A {body.get('style', 'vivid')} picture of {body['prompt']}"
        if body.get("response_format", "url") == "url" or self.return_urls:
            entries = [{"url": self.publish(request, item), "revised_prompt": revised} for item in data]
        else:
            entries = [{"b64_json": self.encode(item), "revised_prompt": revised} for item in data]
        return JSONResponse({"created": int(time.time()), "data": entries})

    def refusal(self, body: dict[str, Any]) -> Response | None:
        if self.fail_status is not None:
            return error(self.fail_status, f"fake failure {self.fail_status}", None, "server_error")
        if body.get("model") not in ("dall-e-3", *GPT_MODELS) or self.shut_down(body):
            return not_found(body.get("model"))
        if self.out_of_credit:
            message = "You exceeded your current quota, please check your plan and billing details."
            return error(429, message, "insufficient_quota", "insufficient_quota")
        return None

    def shut_down(self, body: dict[str, Any]) -> bool:
        return self.retired and body.get("model") in RETIRED

    def gpt_answer(self, body: dict[str, Any], prefix: str = "image_generation") -> Response:
        if problem := gpt_invalid(body):
            return error(400, *problem)
        if self.moderate:
            return error(400, SAFETY_MESSAGE, self.moderate)
        size = body.get("size", "auto")
        width, height = (1024, 1024) if size == "auto" else (int(side) for side in size.split("x"))
        output_format = body.get("output_format", "png")
        n = 0 if self.empty else body.get("n", 1)
        images = [self.encode(self.image(width, height, FORMATS[output_format])) for _ in range(n)]
        quality = body.get("quality", "auto").replace("auto", "medium")
        square, larger = OUTPUT_TOKENS[quality]
        per_image = square if width == height else larger
        text = len(body["prompt"].split())
        usage = {
            "input_tokens": text,
            "output_tokens": per_image * n,
            "total_tokens": text + per_image * n,
            "input_tokens_details": {"text_tokens": text, "image_tokens": 0},
        }
        answer = {
            "created": int(time.time()),
            "data": [{"b64_json": image} for image in images],
            "background": body.get("background", "auto").replace("auto", "opaque"),
            "output_format": output_format,
            "quality": quality,
            "size": f"{width}x{height}",
            "usage": usage,
        }
        if self.drop_usage:
            del answer["usage"]
        if body.get("stream") in (True, "true"):
            return StreamingResponse(self.events(body, answer, prefix), media_type="text/event-stream")
        return JSONResponse(answer)

    async def events(self, body: dict[str, Any], answer: dict[str, Any], prefix: str) -> AsyncIterator[bytes]:
        """Each image's partial images (the image itself, as a stand-in), then the image."""
        settings = {name: body.get(name, "auto") for name in ("quality", "background")}
        settings |= {"size": answer["size"], "output_format": answer["output_format"], "created_at": int(time.time())}
        try:
            for item in answer["data"]:
                for index in range(int(body.get("partial_images", 0)) + self.extra_partials):
                    if index == self.stream_error_after:
                        error = {"message": "The image could not be finished.", "type": "server_error"}
                        yield event("error", {"type": "error", "error": error | {"param": None, "code": None}})
                        return
                    partial = {
                        "type": f"{prefix}.partial_image",
                        "b64_json": item["b64_json"],
                        "partial_image_index": index,
                    }
                    yield event(partial["type"], partial | settings | {"created_at": int(time.time())})
                    await asyncio.sleep(self.event_delay)
                done = {"type": f"{prefix}.completed", "b64_json": item["b64_json"], "usage": answer.get("usage")}
                yield event(done["type"], done | settings)
        except asyncio.CancelledError:
            self.streams_closed += 1
            raise

    async def edit(self, request: Request) -> Response:
        """`POST /v1/images/edits`, multipart: `image` or repeated `image[]` (1-16 PNG, JPEG or WebP
        files), an optional PNG `mask` the size of the first, and the GPT image models' fields as text."""
        if request.headers.get("authorization") != f"Bearer {self.api_key}":
            return self.unauthorized()
        form = await request.form()
        files = [*form.getlist("image"), *form.getlist("image[]")]
        fields = {name: value for name, value in form.multi_items() if isinstance(value, str)}
        seen = {"images": [described(file) for file in files if not isinstance(file, str)], "fields": fields}
        mask = form.get("mask")
        seen["mask"] = described(mask) if mask is not None and not isinstance(mask, str) else None
        self.edits.append(seen)
        body: dict[str, Any] = {
            name: int(value) if name in ("n", "output_compression", "partial_images") else value
            for name, value in fields.items()
        }
        if self.shut_down(body):
            return not_found(body.get("model"))
        if body.get("model") not in GPT_MODELS:
            return error(
                400, f"Invalid value: '{body.get('model')}'. Value must be one of {GPT_MODELS}.", "invalid_value"
            )
        if "moderation" in body:
            return error(400, "Unknown parameter: 'moderation'.", "unknown_parameter")
        images = seen["images"]
        if not 1 <= len(images) <= 16 or any(kind not in FORMATS.values() for _, kind, _ in images):
            return error(400, "Invalid 'image': 1 to 16 PNG, JPEG or WebP images.", "invalid_value")
        if seen["mask"] is not None and (seen["mask"][1] != "PNG" or seen["mask"][2] != images[0][2]):
            return error(400, "Invalid 'mask': a PNG the size of the first image.", "invalid_value")
        return self.gpt_answer(body, prefix="image_edit")


def event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


def described(upload: Any) -> tuple[str, str | None, tuple[int, int] | None]:
    """(filename, Pillow format, size) of an uploaded file; format and size None when it is no image."""
    upload.file.seek(0)
    try:
        with Image.open(upload.file) as image:
            return upload.filename, image.format, image.size
    except (UnidentifiedImageError, OSError):
        return upload.filename, None, None


def gpt_invalid(body: dict[str, Any]) -> tuple[str, str] | None:
    """(message, code) for what OpenAI rejects in a GPT image model's request."""
    for unknown in ("response_format", "style"):
        if unknown in body:
            return f"Unknown parameter: '{unknown}'.", "unknown_parameter"
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt or len(prompt) > 32000:
        return "Invalid 'prompt': must be a string of 1 to 32000 characters.", "invalid_value"
    if not 1 <= body.get("n", 1) <= 10:
        return "Invalid 'n': must be between 1 and 10.", "invalid_value"
    if not gpt_size_ok(body["model"], body.get("size", "auto")):
        return "The size is not supported by this model.", "invalid_size"
    for field, allowed in (
        ("quality", ("auto", "low", "medium", "high")),
        ("background", ("auto", "opaque", "transparent")),
        ("moderation", ("auto", "low")),
        ("output_format", tuple(FORMATS)),
    ):
        if body.get(field, "auto" if "auto" in allowed else allowed[0]) not in allowed:
            return f"Invalid value: '{body[field]}'. Supported values are: {allowed}.", "invalid_value"
    output_format = body.get("output_format", "png")
    if body.get("background") == "transparent" and output_format == "jpeg":
        return "Transparent background is not supported for jpeg output.", "invalid_value"
    if "output_compression" in body and (output_format == "png" or not 0 <= body["output_compression"] <= 100):
        return "output_compression must be 0-100 and needs jpeg or webp output.", "invalid_value"
    return None


def gpt_size_ok(model: str, size: str) -> bool:
    if size in GPT_SIZES:
        return True
    if not model.startswith("gpt-image-2"):
        return False
    width, height = (int(side) for side in size.split("x"))
    long, short = max(width, height), min(width, height)
    multiples = width % 16 == 0 and height % 16 == 0
    return multiples and long <= 3840 and long <= 3 * short and 655_360 <= width * height <= 8_294_400


def invalid(body: dict[str, Any]) -> tuple[str, str] | None:
    """(message, code) for what OpenAI rejects in a dall-e-3 request."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt or len(prompt) > 4000:
        return "Invalid 'prompt': must be a string of 1 to 4000 characters.", "invalid_value"
    if body.get("n", 1) != 1:
        return "You must provide n=1 for this model.", "invalid_value"
    if body.get("size", "1024x1024") not in SIZES:
        return "The size is not supported by this model.", "invalid_size"
    for field, allowed in (("quality", ("standard", "hd")), ("style", ("vivid", "natural"))):
        if body.get(field, allowed[0]) not in allowed:
            return f"Invalid value: '{body[field]}'. Supported values are: {allowed}.", "invalid_value"
    if body.get("response_format", "url") not in ("url", "b64_json"):
        return "Invalid value for response_format.", "invalid_value"
    return None


def not_found(model: Any) -> JSONResponse:
    return error(404, f"The model `{model}` does not exist or you do not have access to it.", "model_not_found")


def error(status: int, message: str, code: str | None, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status)
