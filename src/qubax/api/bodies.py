"""How routes read request bodies: at most MAX_BODY_BYTES of JSON, or `QUBAX_MAX_UPLOAD_BYTES` of
uploads (a larger body is refused with 413 as soon as it is seen to be larger), and JSON that does not
parse is judged after authentication, as OpenAI does.

A FastAPI route class, the framework's way to change how a route reads its request. Starlette's own
body limit answers a too-large declared Content-Length with a plain-text 413 of its own; ours goes
through the app's exception handlers, so it gets OpenAI's error body like every other refusal."""

from collections.abc import AsyncGenerator, Callable, Coroutine
from typing import Any

import orjson
from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

MAX_BODY_BYTES = 1024 * 1024


NOT_JSON = object()  # what `json()` gives for a body that is not JSON


class LimitedRequest(Request):
    @property
    def limit(self) -> int:
        return MAX_BODY_BYTES

    async def stream(self) -> AsyncGenerator[bytes, None]:
        """The body as it arrives, refused once past the limit: whoever reads it (the JSON parser, the
        multipart parser spooling uploads to disk) never holds more."""
        declared = self.headers.get("content-length", "")
        if declared.isascii() and declared.isdigit() and int(declared) > self.limit:
            raise too_large(self.limit)
        size = 0
        async for chunk in super().stream():
            size += len(chunk)
            if size > self.limit:
                raise too_large(self.limit)
            yield chunk

    async def json(self) -> Any:
        """The parsed body, or NOT_JSON: FastAPI parses a body before it runs the route's dependencies, and
        a body that is not JSON must fail validation, after authentication, not before it.

        orjson, which is strict where the standard library is lax: a lone UTF-16 surrogate (which no
        later encoding accepts), NaN, or nesting past 1,024 levels (a RecursionError in `json`) is not
        JSON here. Integers past 64 bits become floats, which the integer fields refuse as out of range."""
        if not hasattr(self, "_json"):
            try:
                self._json = orjson.loads(await self.body())
            except orjson.JSONDecodeError:
                self._json = NOT_JSON
        return self._json

    async def body(self) -> bytes:
        if not hasattr(self, "_body"):
            self._body = b"".join([chunk async for chunk in self.stream()])
        return self._body


class UploadRequest(LimitedRequest):
    @property
    def limit(self) -> int:
        limit: int = self.app.state.services.settings.max_upload_bytes
        return limit


def too_large(limit: int) -> HTTPException:
    # An HTTPException: FastAPI turns any other exception raised while reading a body into a 400.
    return HTTPException(413, f"Request body is larger than the {limit} byte limit.")


class LimitedRoute(APIRoute):
    request_class: type[LimitedRequest] = LimitedRequest

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def limited(request: Request) -> Response:
            return await handler(self.request_class(request.scope, request.receive))

        return limited


class UploadRoute(LimitedRoute):
    """A route that takes uploads (multipart/form-data), up to the operator's limit, read only once
    `admit` has let the request in on its head alone: FastAPI reads a body before it runs the route's
    dependencies, so a refusal among them (no key, no session) would come only after the whole upload."""

    request_class = UploadRequest

    async def admit(self, request: Request) -> None:
        """Raise to refuse a request before its body is read; this one admits any."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def admitted(request: Request) -> Response:
            await self.admit(request)
            return await handler(request)

        return admitted
