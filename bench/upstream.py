"""A fast fake OpenAI Images upstream: answers a precomputed `b64_json` PNG for the requested size.

    python -m bench.upstream --port 9001 --payload light|heavy [--server aiohttp|asgi] [--delay SECONDS]

The server is bare uvicorn (uvloop, httptools) with a raw ASGI app for `light` and aiohttp.web for
`heavy`: whichever was faster for that payload.

`light` is a flat single-colour PNG (a few KB: pure overhead); `heavy` is grey-level noise (~1.5 MB:
payload handling). Bodies are built once per size (1024x1024 at start) and served as bytes. `--delay`
holds each generation that long before answering, as a real upstream takes its time (bench/realistic.py).
"""

import argparse
import asyncio
import base64
import io
import json
import os
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from PIL import Image

SIZE_RE = re.compile(rb'"size"\s*:\s*"(\d{2,4})x(\d{2,4})"')
DEFAULT_SIZE = (1024, 1024)
# Measured here (wrk -t1 -c32, 2 cores): light, ASGI ~29k req/s vs aiohttp ~20k; heavy, aiohttp ~1.7k vs ASGI ~1.1k.
FASTER = {"light": "asgi", "heavy": "aiohttp"}
CREATED = int(time.time())


def make_png(width: int, height: int, payload: str) -> bytes:
    if payload == "light":
        image, level = Image.new("RGB", (width, height), (40, 120, 200)), 9  # about 4.5 KB at 1024x1024
    else:
        # Grey noise barely compresses: about 1.5 MB at 1024x1024.
        image, level = Image.frombytes("L", (width, height), os.urandom(width * height)).convert("RGB"), 1
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=level)
    return buffer.getvalue()


def make_body(width: int, height: int, payload: str) -> bytes:
    b64 = base64.b64encode(make_png(width, height, payload)).decode("ascii")
    return json.dumps({"created": CREATED, "data": [{"b64_json": b64}]}).encode()


def body_lookup(payload: str) -> Callable[[bytes], bytes]:
    """A function from request bytes to response bytes; other sizes are built on first use, then cached."""
    cache = {DEFAULT_SIZE: make_body(*DEFAULT_SIZE, payload)}

    def lookup(request: bytes) -> bytes:
        match = SIZE_RE.search(request)
        size = (int(match[1]), int(match[2])) if match else DEFAULT_SIZE
        if size not in cache:
            cache[size] = make_body(*size, payload)
        return cache[size]

    return lookup


BACKLOG = 8192  # a burst of thousands of new connections (the kernel caps it at somaxconn)


def serve_aiohttp(port: int, lookup: Callable[[bytes], bytes], delay: float = 0.0) -> None:
    import uvloop
    from aiohttp import web

    async def generations(request: web.Request) -> web.Response:
        body = await request.read()
        if delay:
            await asyncio.sleep(delay)
        return web.Response(body=lookup(body), content_type="application/json")

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(client_max_size=4 * 1024 * 1024)
    app.router.add_post("/v1/images/generations", generations)
    app.router.add_get("/health", health)
    loop = uvloop.new_event_loop()
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, loop=loop, backlog=BACKLOG)


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]


def asgi_app(lookup: Callable[[bytes], bytes], delay: float = 0.0) -> Callable[..., Awaitable[None]]:
    json_headers = [(b"content-type", b"application/json")]

    async def app(
        scope: Scope, receive: Callable[[], Awaitable[Message]], send: Callable[[Message], Awaitable[None]]
    ) -> None:
        if scope["type"] != "http":
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        if scope["method"] == "POST" and scope["path"] == "/v1/images/generations":
            if delay:
                await asyncio.sleep(delay)
            status, body, headers = 200, lookup(b"".join(chunks)), json_headers
        elif scope["path"] == "/health":
            status, body, headers = 200, b"ok", []
        else:
            status, body, headers = 404, b"{}", json_headers
        await respond(send, status, body, headers)

    return app


async def respond(send: Callable[..., Awaitable[None]], status: int, body: bytes, headers: list[Any]) -> None:
    """One whole ASGI answer."""
    # Without content-length uvicorn would answer chunked, which costs the client more to read.
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def serve_asgi(port: int, lookup: Callable[[bytes], bytes], delay: float = 0.0) -> None:
    run_uvicorn(asgi_app(lookup, delay), port)


def run_uvicorn(app: Any, port: int) -> None:
    """Serve a fake upstream's ASGI app as fast as uvicorn goes, for bursts of thousands of connections."""
    import uvicorn

    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
        lifespan="off",
        backlog=BACKLOG,
        # uvicorn's 5 s would close idle connections before the gateway's pool does (aiohttp's 15 s), and
        # a request sent on one as it closes fails; real upstreams keep them longer (aiohttp.web's 75 s).
        timeout_keep_alive=75,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--payload", choices=["light", "heavy"], default="light")
    parser.add_argument("--server", choices=["aiohttp", "asgi"], help="default: the faster one for the payload")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds each generation takes (default 0)")
    args = parser.parse_args()
    server = args.server or FASTER[args.payload]
    (serve_aiohttp if server == "aiohttp" else serve_asgi)(args.port, body_lookup(args.payload), args.delay)


if __name__ == "__main__":
    main()
