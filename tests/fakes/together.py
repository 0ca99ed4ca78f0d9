"""A fake Together AI images endpoint, written from Together's public API docs.

`POST /v1/images/generations` with `Authorization: Bearer <key>`; synchronous; `n` 1-4;
`response_format` `url` | `base64`; `output_format` `jpeg` (default) | `png`; 422 when the safety
checker trips. Result URLs are served by the fake itself under `/files/`.
"""

import asyncio
import base64
import io
import itertools
from typing import Any

from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

MODELS = ("black-forest-labs/FLUX.1-schnell", "black-forest-labs/FLUX.1-schnell-Free", "black-forest-labs/FLUX.1.1-pro")
FORMATS = {"jpeg": "JPEG", "png": "PNG"}


class FakeTogether:
    def __init__(self, api_key: str = "test-key") -> None:
        self.api_key = api_key
        self.requests: list[dict[str, Any]] = []  # every generation body, as received
        self.downloads: list[str] = []  # every /files/ path fetched
        self.files: dict[str, bytes] = {}
        # Fault knobs, off by default.
        self.fail_status: int | None = None  # answer every generation with this status
        self.garbage = False  # answer with an HTML page instead of JSON
        self.moderate = False  # the safety checker trips (422)
        self.return_urls = False  # hand out URLs even when base64 was asked for
        self.url_host: str | None = None  # put URLs on this host name instead of our own
        self.format_override: str | None = None  # encode as this Pillow format whatever was asked
        self.bad_base64 = False
        self.drop = 0  # return this many images fewer than asked
        self.delay = 0.0  # seconds each generation takes, to observe concurrency
        self.in_flight = 0
        self.peak = 0  # the most generations that were running at once
        self._colors = itertools.count()
        self.app = Starlette(
            routes=[
                Route("/v1/images/generations", self.generate, methods=["POST"]),
                Route("/files/{name}", self.file),
            ]
        )

    async def generate(self, request: Request) -> Response:
        if request.headers.get("authorization") != f"Bearer {self.api_key}":
            return error(401, "Invalid API key provided.", "invalid_api_key")
        body = await request.json()
        self.requests.append(body)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
            return self.answer(request, body)
        finally:
            self.in_flight -= 1

    def answer(self, request: Request, body: dict[str, Any]) -> Response:
        if self.garbage:
            return Response(
                "<html><body>502 Bad Gateway</body></html>", self.fail_status or 200, media_type="text/html"
            )
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

    def image(self, width: int, height: int, kind: str) -> bytes:
        # A new colour per image, so tests can tell images apart.
        shade = next(self._colors) * 37 % 256
        out = io.BytesIO()
        Image.new("RGB", (width, height), (shade, 255 - shade, 128)).save(out, kind)
        return out.getvalue()

    def encode(self, data: bytes) -> str:
        return "%%% not base64 %%%" if self.bad_base64 else base64.b64encode(data).decode()

    def publish(self, request: Request, data: bytes) -> str:
        name = f"img-{len(self.files)}"
        self.files[name] = data
        host = self.url_host or request.url.hostname
        return f"{request.url.scheme}://{host}:{request.url.port}/files/{name}"

    async def file(self, request: Request) -> Response:
        self.downloads.append(request.url.path)
        if not request.headers.get("user-agent"):  # Together's CDN refuses an empty User-Agent
            return Response("Forbidden", 403)
        data = self.files.get(request.path_params["name"])
        return Response(data, media_type="image/png") if data else Response("Not Found", 404)


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
