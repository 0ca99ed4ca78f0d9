"""The floor: the least a Python gateway can do. Starlette on uvicorn (uvloop, httptools) with one shared
aiohttp session; forwards the request body to the upstream and returns its bytes, status and content type.

`--framework fastapi` is the same forwarder on the parts issue 25 keeps, with nothing of Qubax's own work:
a FastAPI route that validates the body as Qubax's `ImageGenerateRequest` and takes a bearer key through
FastAPI's `HTTPBearer` dependency, then forwards as the floor does. What it costs over the floor is the
framework's; what Qubax costs over it is Qubax's own.

    python -m bench.floor --port 9002 --upstream http://127.0.0.1:9001/v1 [--framework fastapi]
"""

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

import aiohttp
import uvicorn
from fastapi import Depends, FastAPI
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route


def create_app(upstream: str, framework: str = "starlette") -> Starlette:
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

    if framework == "starlette":
        routes = [Route("/v1/images/generations", generations, methods=["POST"]), Route("/health", health)]
        return Starlette(routes=routes, lifespan=lifespan)
    from qubax.protocol import ImageGenerateRequest  # the body type Qubax's route validates

    app = FastAPI(lifespan=lifespan)
    key = Annotated[HTTPAuthorizationCredentials, Depends(HTTPBearer())]

    @app.post("/v1/images/generations")
    async def validated(body: ImageGenerateRequest, request: Request, _: key) -> Response:
        return await generations(request)  # the body FastAPI read, as it came

    app.add_route("/health", health)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="base URL ending in /v1")
    parser.add_argument("--framework", choices=["starlette", "fastapi"], default="starlette")
    args = parser.parse_args()
    uvicorn.run(
        create_app(args.upstream, args.framework),
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
