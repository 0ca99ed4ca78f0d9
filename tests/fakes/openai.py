"""A fake OpenAI Images API serving dall-e-3, written from OpenAI's public API reference.

`POST /v1/images/generations` with `Authorization: Bearer <key>`; dall-e-3 takes only `n=1` and the
sizes 1024x1024, 1792x1024, 1024x1792; answers `{"created", "data": [{"b64_json"|"url", "revised_prompt"}]}`
and errors as `{"error": {"message", "type", "param", "code"}}`. Result URLs are served under `/files/`.
"""

import asyncio
import base64
import io
import itertools
import time
from typing import Any

from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

SIZES = ("1024x1024", "1792x1024", "1024x1792")
SAFETY_MESSAGE = (
    "Your request was rejected as a result of our safety system. "
    "Your prompt may contain text that is not allowed by our safety system."
)


class FakeOpenAI:
    def __init__(self, api_key: str = "test-key") -> None:
        self.api_key = api_key
        self.requests: list[dict[str, Any]] = []  # every generation body, as received
        self.downloads: list[str] = []  # every /files/ path fetched
        self.files: dict[str, bytes] = {}
        # Fault knobs, off by default.
        self.fail_status: int | None = None  # answer every generation with this status
        self.garbage = False  # answer with an HTML page instead of JSON
        self.moderate: str | None = None  # error code for a 400 safety refusal, e.g. content_policy_violation
        self.retired = False  # 404 model_not_found, as OpenAI has answered for dall-e-3 since 2026-05-12
        self.out_of_credit = False  # 429 insufficient_quota
        self.return_urls = False  # hand out URLs even when b64_json was asked for
        self.url_host: str | None = None  # put URLs on this host name instead of our own
        self.image_format = "PNG"  # the Pillow format images are encoded in
        self.bad_base64 = False
        self.empty = False  # answer 200 with no images
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
            return error(401, "Incorrect API key provided: test-***.", "invalid_api_key")
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
        if refusal := self.refusal(body):
            return refusal
        if problem := invalid(body):
            return error(400, *problem)
        if self.moderate:
            return error(400, SAFETY_MESSAGE, self.moderate)
        width, height = (int(side) for side in body.get("size", "1024x1024").split("x"))
        data = [] if self.empty else [self.image(width, height)]
        revised = f"A {body.get('style', 'vivid')} picture of {body['prompt']}"
        if body.get("response_format", "url") == "url" or self.return_urls:
            entries = [{"url": self.publish(request, item), "revised_prompt": revised} for item in data]
        else:
            entries = [{"b64_json": self.encode(item), "revised_prompt": revised} for item in data]
        return JSONResponse({"created": int(time.time()), "data": entries})

    def refusal(self, body: dict[str, Any]) -> Response | None:
        if self.fail_status is not None:
            return error(self.fail_status, f"fake failure {self.fail_status}", None, "server_error")
        if self.retired or body.get("model") != "dall-e-3":
            model = body.get("model")
            return error(404, f"The model `{model}` does not exist or you do not have access to it.", "model_not_found")
        if self.out_of_credit:
            message = "You exceeded your current quota, please check your plan and billing details."
            return error(429, message, "insufficient_quota", "insufficient_quota")
        return None

    def image(self, width: int, height: int) -> bytes:
        # A new colour per image, so tests can tell images apart.
        shade = next(self._colors) * 37 % 256
        out = io.BytesIO()
        Image.new("RGB", (width, height), (shade, 255 - shade, 128)).save(out, self.image_format)
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
        data = self.files.get(request.path_params["name"])
        return Response(data, media_type="image/png") if data else Response("Not Found", 404)


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


def error(status: int, message: str, code: str | None, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status)
