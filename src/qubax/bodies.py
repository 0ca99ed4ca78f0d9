"""How routes read request bodies: at most MAX_BODY_BYTES (a larger one is refused with 413 before it
is read whole), and JSON that does not parse is judged after authentication, as OpenAI does.

A FastAPI route class, the framework's way to change how a route reads its request. Starlette's own
body limit answers a too-large declared Content-Length with a plain-text 413 of its own; ours goes
through the app's exception handlers, so it gets OpenAI's error body like every other refusal."""

from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

MAX_BODY_BYTES = 1024 * 1024


NOT_JSON = object()  # what `json()` gives for a body that is not JSON


class LimitedRequest(Request):
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
            declared = self.headers.get("content-length", "")
            if declared.isascii() and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
                raise too_large()
            chunks, size = [], 0
            async for chunk in self.stream():
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    raise too_large()
                chunks.append(chunk)
            self._body = b"".join(chunks)
        return self._body


def too_large() -> HTTPException:
    # An HTTPException: FastAPI turns any other exception raised while reading a body into a 400.
    return HTTPException(413, f"Request body is larger than the {MAX_BODY_BYTES} byte limit.")


class LimitedRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def limited(request: Request) -> Response:
            return await handler(LimitedRequest(request.scope, request.receive))

        return limited
