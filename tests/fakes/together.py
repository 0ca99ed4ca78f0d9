"""A fake Together AI images endpoint, written from Together's public API docs.

`POST /v1/images/generations` with `Authorization: Bearer <key>`; synchronous; `n` 1-4;
`response_format` `url` | `base64`; `output_format` `jpeg` (default) | `png`; 422 when the safety
checker trips. Result URLs are served by the fake itself under `/files/`.
"""

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tests.fakes import ImagesFake

MODELS = ("black-forest-labs/FLUX.1-schnell", "black-forest-labs/FLUX.1-schnell-Free", "black-forest-labs/FLUX.1.1-pro")
FORMATS = {"jpeg": "JPEG", "png": "PNG"}


class FakeTogether(ImagesFake):
    def __init__(self, api_key: str = "test-key") -> None:
        super().__init__(api_key)
        self.moderate = False  # the safety checker trips (422)
        self.format_override: str | None = None  # encode as this Pillow format whatever was asked
        self.drop = 0  # return this many images fewer than asked

    def unauthorized(self) -> Response:
        return error(401, "Invalid API key provided.", "invalid_api_key")

    def answer(self, request: Request, body: dict[str, Any]) -> Response:
        if self.fail_status is not None:
            return error(self.fail_status, f"fake failure {self.fail_status}", None)
        if problem := invalid(body):
            return error(400, problem, "invalid_request")
        if self.moderate:
            return error(422, "NSFW content detected. Please try again with a different prompt.", None)
        kind = self.format_override or FORMATS[body.get("output_format", "jpeg")]
        images = [self.image(body["width"], body["height"], kind) for _ in range(body.get("n", 1) - self.drop)]
        if body.get("response_format") == "url" or self.return_urls:
            entries = [{"index": i, "url": self.publish(request, data)} for i, data in enumerate(images)]
        else:
            entries = [{"index": i, "b64_json": self.encode(data)} for i, data in enumerate(images)]
        return JSONResponse({"id": "fake-id", "model": body["model"], "object": "list", "data": entries})

    def refuse_download(self, request: Request) -> Response | None:
        if not request.headers.get("user-agent"):  # Together's CDN refuses an empty User-Agent
            return Response("Forbidden", 403)
        return None


def invalid(body: dict[str, Any]) -> str | None:
    """What Together would reject in the body, per its API reference."""
    if body.get("model") not in MODELS:
        return f"Unable to access model {body.get('model')}."
    if not isinstance(body.get("prompt"), str) or not body["prompt"]:
        return "prompt is required."
    for side in ("width", "height"):
        value = body.get(side)
        if not isinstance(value, int) or not 64 <= value <= 1792 or value % 8:
            return f"{side} must be a multiple of 8 between 64 and 1792."
    if not isinstance(body.get("n", 1), int) or not 1 <= body.get("n", 1) <= 4:
        return "n must be between 1 and 4."
    if "steps" in body and (not isinstance(body["steps"], int) or not 1 <= body["steps"] <= 50):
        return "steps must be between 1 and 50."
    if body.get("response_format", "url") not in ("url", "base64"):
        return "response_format must be url or base64."
    if body.get("output_format", "jpeg") not in FORMATS:
        return "output_format must be jpeg or png."
    return None


def error(status: int, message: str, code: str | None) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}, status
    )
