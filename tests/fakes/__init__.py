"""Fake upstream servers, plus the parts the image-generation fakes share."""

import asyncio
import base64
import io
import itertools
from typing import Any

from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


def decode_image(text: Any) -> Image.Image | None:
    """A base64 image, as the FLUX upstreams take inputs; None when it is not one."""
    try:
        image = Image.open(io.BytesIO(base64.b64decode(str(text), validate=True)))
        image.load()
    except (ValueError, OSError):
        return None
    return image


def decode_data_uri(uri: Any) -> Image.Image | None:
    """A `data:image/...;base64,` URI's image (what we send where a URL is taken); None otherwise."""
    if not isinstance(uri, str) or not uri.startswith("data:image/") or ";base64," not in uri:
        return None
    return decode_image(uri.split(",", 1)[1])


class ImagesFake:
    """A synchronous `POST /v1/images/generations` endpoint whose result URLs it serves under `/files/`.

    Subclasses say how a bad key is refused (`unauthorized`) and how a generation is answered (`answer`).
    """

    def __init__(self, api_key: str = "test-key") -> None:
        self.api_key = api_key
        self.requests: list[dict[str, Any]] = []  # every generation body, as received
        self.downloads: list[str] = []  # every /files/ path fetched
        self.files: dict[str, bytes] = {}
        # Fault knobs, off by default.
        self.fail_status: int | None = None  # answer every generation with this status
        self.garbage = False  # answer with an HTML page instead of JSON
        self.return_urls = False  # hand out URLs even when base64 was asked for
        self.url_host: str | None = None  # put URLs on this host name instead of our own
        self.bad_base64 = False
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

    def unauthorized(self) -> Response:
        raise NotImplementedError

    def answer(self, request: Request, body: dict[str, Any]) -> Response:
        raise NotImplementedError

    async def generate(self, request: Request) -> Response:
        if request.headers.get("authorization") != f"Bearer {self.api_key}":
            return self.unauthorized()
        body = await request.json()
        self.requests.append(body)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
            if self.garbage:
                html = "<html><body>502 Bad Gateway</body></html>"
                return Response(html, self.fail_status or 200, media_type="text/html")
            return self.answer(request, body)
        finally:
            self.in_flight -= 1

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

    def refuse_download(self, request: Request) -> Response | None:
        """A response that turns a `/files/` fetch away, or None to serve it."""
        return None

    async def file(self, request: Request) -> Response:
        self.downloads.append(request.url.path)
        if refusal := self.refuse_download(request):
            return refusal
        data = self.files.get(request.path_params["name"])
        return Response(data, media_type="image/png") if data else Response("Not Found", 404)
