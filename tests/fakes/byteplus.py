"""A fake BytePlus ModelArk images endpoint, written from ModelArk's image generation API reference
(docs.byteplus.com/en/docs/ModelArk/1541523) and its error codes (/1299023).

`POST /api/v3/images/generations` with `Authorization: Bearer <key>`, synchronous. Seedream 4.0 and 4.5:
`size` is `1K`/`2K`/`4K` (4.5: `2K`/`4K`) or `WxH` within the model's pixel range and an aspect ratio
within 1:16 and 16:1; `image` one reference image or a list of up to 14 (URL or `data:image/<fmt>;base64,`;
the fake reads only data URIs); `sequential_image_generation` `auto` (up to
`sequential_image_generation_options.max_images`, inputs and outputs at most 15) or `disabled` (one
image); `response_format` `url` (served by the fake under `/files/`) or `b64_json`; `watermark` (default
true). Images are JPEG. Errors are `{"error": {"code", "message", "param", "type"}}`.
"""

from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes import ImagesFake, decode_data_uri

MIN_PIXELS = {"seedream-4-0-250828": 1280 * 720, "seedream-4-5-251128": 2560 * 1440}
MAX_PIXELS = 4096 * 4096
PRESETS = {"seedream-4-0-250828": ("1K", "2K", "4K"), "seedream-4-5-251128": ("2K", "4K")}
PRESET_SIZES = {"1K": (1024, 1024), "2K": (2048, 2048), "4K": (4096, 4096)}
FIELDS = {"model", "prompt", "image", "size", "seed", "sequential_image_generation"}
FIELDS |= {"sequential_image_generation_options", "stream", "response_format", "watermark", "optimize_prompt_options"}
MAX_REFERENCES, MAX_TOTAL = 14, 15


class FakeModelArk(ImagesFake):
    def __init__(self, api_key: str = "test-key") -> None:
        super().__init__(api_key)
        self.refuse: str | None = None  # answer 400 with this error code (InputTextSensitiveContentDetected, …)
        self.item_error: str | None = None  # answer 200 with one failed image carrying this error code
        self.app = Starlette(
            routes=[
                Route("/api/v3/images/generations", self.generate, methods=["POST"]),
                Route("/files/{name}", self.file),
            ]
        )

    def unauthorized(self) -> Response:
        message = "The API key in the request is missing or invalid. Request id: fake"
        return error(401, "AuthenticationError", message, None, "Unauthorized")

    def answer(self, request: Request, body: dict[str, Any]) -> Response:
        if self.fail_status is not None:
            return error(self.fail_status, "InternalServiceError", f"fake failure {self.fail_status}", None)
        if problem := invalid(body):
            return error(400, "InvalidParameter", problem[1], problem[0])
        if self.refuse is not None:
            message = "The request failed because the input text may contain sensitive information."
            return error(400, self.refuse, message, None)
        width, height = output_size(body)
        count = count_of(body)
        if self.item_error is not None:
            message = "The request failed because the output image may contain sensitive information."
            entries: list[dict[str, Any]] = [{"error": {"code": self.item_error, "message": message}}]
            return JSONResponse({"model": body["model"], "created": 1757323224, "data": entries, "usage": usage(0, 0)})
        images = [self.image(width, height, "JPEG") for _ in range(count)]
        if body.get("response_format", "url") == "url" or self.return_urls:
            entries = [{"url": self.publish(request, data), "size": f"{width}x{height}"} for data in images]
        else:
            entries = [{"b64_json": self.encode(data), "size": f"{width}x{height}"} for data in images]
        answer = {"model": body["model"], "created": 1757323224, "data": entries, "usage": usage(count, width * height)}
        return JSONResponse(answer)


def invalid(body: dict[str, Any]) -> tuple[str, str] | None:
    """(param, message) of what ModelArk would refuse in the body, per its API reference."""
    if unknown := [name for name in body if name not in FIELDS]:
        return unknown[0], f"The parameter `{unknown[0]}` specified in the request is not valid."
    if body.get("model") not in MIN_PIXELS:
        return "model", f"The model or endpoint {body.get('model')} does not exist or you do not have access to it."
    if not isinstance(body.get("prompt"), str) or not body["prompt"]:
        return "prompt", "The request failed because it is missing the required parameter `prompt`."
    if not valid_size(body["model"], body.get("size", "2048x2048")):
        return "size", f"The parameter `size` specified in the request is not valid: {body.get('size')}."
    references = body.get("image", [])
    references = [references] if isinstance(references, str) else references
    if not isinstance(references, list) or len(references) > MAX_REFERENCES:
        return "image", f"The parameter `image` takes at most {MAX_REFERENCES} images."
    if any(decode_data_uri(uri) is None for uri in references):
        return "image", "The parameter `image` specified in the request is not valid: could not read the image."
    if body.get("sequential_image_generation", "disabled") not in ("auto", "disabled"):
        return "sequential_image_generation", "The parameter `sequential_image_generation` must be auto or disabled."
    if len(references) + count_of(body) > MAX_TOTAL:
        return "sequential_image_generation_options.max_images", "Input and output images must be at most 15."
    if body.get("response_format", "url") not in ("url", "b64_json"):
        return "response_format", "The parameter `response_format` must be url or b64_json."
    for name in ("watermark", "stream"):
        if not isinstance(body.get(name, False), bool):
            return name, f"The parameter `{name}` must be a boolean."
    if body.get("stream"):
        return "stream", "The fake does not stream."
    return None


def valid_size(model: str, size: Any) -> bool:
    if size in PRESETS[model]:
        return True
    width, _, height = str(size).partition("x")
    if not (width.isdigit() and height.isdigit()):
        return False
    w, h = int(width), int(height)
    return MIN_PIXELS[model] <= w * h <= MAX_PIXELS and 1 / 16 <= w / h <= 16


def output_size(body: dict[str, Any]) -> tuple[int, int]:
    """`WxH` as asked; a preset at 1:1 (the real model picks the aspect ratio from the prompt)."""
    size = body.get("size", "2048x2048")
    if size in PRESET_SIZES:
        return PRESET_SIZES[size]
    width, _, height = size.partition("x")
    return int(width), int(height)


def count_of(body: dict[str, Any]) -> int:
    if body.get("sequential_image_generation", "disabled") != "auto":
        return 1
    options = body.get("sequential_image_generation_options") or {}
    return int(options.get("max_images", 15))


def usage(images: int, pixels: int) -> dict[str, int]:
    tokens = round(images * pixels / 256)  # ModelArk: sum(width * height) / 256
    return {"generated_images": images, "output_tokens": tokens, "total_tokens": tokens}


def error(status: int, code: str, message: str, param: str | None, kind: str = "BadRequest") -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, "param": param, "type": kind}}, status)
