"""The one service function: a checked request in, stored images and a usage record out."""

import asyncio
import base64
import time
from dataclasses import dataclass

import anyio
import httpx
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from qubax import db
from qubax.catalog import CatalogModel, ImageRequest, check_request
from qubax.errors import ModelNotFound, QubaxError, UpstreamError, UpstreamTimeout
from qubax.imaging import to_png
from qubax.protocol import Image, ImageGenerateRequest, ImagesResponse
from qubax.providers import GeneratedImage, Job, Provider
from qubax.providers.placeholder import Placeholder
from qubax.providers.registry import PROVIDERS
from qubax.settings import Settings
from qubax.storage import LocalStorage

TEST_UPSTREAM = "test"


@dataclass
class Services:
    """The long-lived objects the lifespan builds; routes reach them through `app.state.services`."""

    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    http: httpx.AsyncClient
    storage: LocalStorage
    providers: dict[str, Provider]


@dataclass(frozen=True)
class Generated:
    response: ImagesResponse
    upstream: str


async def generate(body: ImageGenerateRequest, key: db.ApiKey, services: Services, public_url: str) -> Generated:
    request = check_request(body)
    upstream, provider, upstream_model = choose_route(request.model, key, services.providers)
    job = Job(upstream_model, request.prompt, request.width, request.height, request.n, request.quality, request.style)
    started = time.monotonic()
    try:
        async with asyncio.timeout(services.settings.request_timeout_seconds):
            images = await provider.generate(job)
            data = await deliver(request, images, services.storage, public_url)
    except TimeoutError as exc:
        error = UpstreamTimeout(f"{upstream} did not finish within the request deadline.")
        await log(services, key, request, upstream, started, 0, error)
        raise error from exc
    except Exception as exc:
        await log(services, key, request, upstream, started, 0, exc)
        raise
    await log(services, key, request, upstream, started, len(data), None)
    return Generated(ImagesResponse(created=int(time.time()), data=data), upstream)


def choose_route(model: CatalogModel, key: db.ApiKey, providers: dict[str, Provider]) -> tuple[str, Provider, str]:
    """Test keys always get the placeholder renderer; live keys the first configured route."""
    if key.test:
        return TEST_UPSTREAM, Placeholder(), model.id
    for route in model.routes:
        if route.provider in providers:
            return route.provider, providers[route.provider], route.upstream_model
    needed = " or ".join(PROVIDERS[route.provider].credential for route in model.routes)
    raise ModelNotFound(
        f"The model `{model.id}` is not available on this server: the operator must set {needed} to enable it."
    )


async def deliver(
    request: ImageRequest, images: list[GeneratedImage], storage: LocalStorage, public_url: str
) -> list[Image]:
    if len(images) != request.n:  # never answer 200 with fewer images than asked
        raise UpstreamError(f"The upstream returned {len(images)} of {request.n} images.")
    inline = request.response_format == "b64_json"
    encoded = await asyncio.gather(
        *(anyio.to_thread.run_sync(encode, image.data, request.width, request.height, inline) for image in images)
    )
    data = []
    for payload, image in zip(encoded, images, strict=True):
        if isinstance(payload, str):
            data.append(Image(b64_json=payload, revised_prompt=image.revised_prompt))
        else:
            url = public_url + storage.signed_path(await storage.put(payload))
            data.append(Image(url=url, revised_prompt=image.revised_prompt))
    return data


def encode(data: bytes, width: int, height: int, inline: bool) -> bytes | str:
    """PNG bytes, or their base64 text when the client wants the image inline (runs in a thread)."""
    png = to_png(data, width, height)
    return base64.b64encode(png).decode() if inline else png


async def log(
    services: Services,
    key: db.ApiKey,
    request: ImageRequest,
    upstream: str,
    started: float,
    delivered: int,
    error: BaseException | None,
) -> None:
    """Record the attempt; only delivered images of live keys cost anything."""
    cost = 0 if key.test else int(request.cost_per_image * 1_000_000) * delivered
    outcome = "ok" if error is None else (getattr(error, "code", None) or "server_error")
    generation = db.Generation(
        key_id=key.id,
        model=request.model.id,
        upstream=upstream,
        n=request.n,
        size=request.size,
        images=delivered,
        cost_micros=cost,
        latency_ms=int((time.monotonic() - started) * 1000),
        outcome=outcome if isinstance(error, QubaxError) or error is None else "server_error",
        error=None if error is None else str(error)[:1000],
    )
    async with services.sessions() as session:
        await db.record(session, generation)
