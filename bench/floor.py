"""The floor: the least a Python gateway can do. Starlette on uvicorn (uvloop, httptools) with one shared
aiohttp session; forwards the request body to the upstream and returns its bytes, status and content type.

    python -m bench.floor --port 9002 --upstream http://127.0.0.1:9001/v1
"""

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route


def create_app(upstream: str) -> Starlette:
    session: aiohttp.ClientSession | None = None
    url = f"{upstream}/images/generations"

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        nonlocal session
        # No cap on upstream connections (aiohttp's default is 100), as Qubax has none of its own.
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        try:
            yield
        finally:
            await session.close()

    async def generations(request: Request) -> Response:
        assert session is not None
        headers = {"content-type": request.headers.get("content-type", "application/json")}
        async with session.post(url, data=await request.body(), headers=headers) as upstream_response:
            body = await upstream_response.read()
            media_type = upstream_response.headers.get("content-type")
            return Response(body, status_code=upstream_response.status, media_type=media_type)

    async def health(request: Request) -> Response:
        return PlainTextResponse("ok")

    routes = [Route("/v1/images/generations", generations, methods=["POST"]), Route("/health", health)]
    return Starlette(routes=routes, lifespan=lifespan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="base URL ending in /v1")
    args = parser.parse_args()
    uvicorn.run(
        create_app(args.upstream),
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
