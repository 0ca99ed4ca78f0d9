"""Helpers every adapter test shares."""

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from qubax.providers import GeneratedImage, Provider, Upstream
from qubax.providers.transport import open_session
from qubax.routing.catalog import Catalog
from qubax.routing.request import ImageRequest
from tests.catalog import MODELS


@dataclass(frozen=True)
class Job:
    """Shorthand for adapter tests: the upstream's model name and what the request asks of it."""

    model: str
    prompt: str
    width: int
    height: int
    n: int
    quality: str | None = None
    style: str | None = None
    seed: int | None = None
    safety_tolerance: int | None = None
    output_format: str = "png"
    background: str | None = None
    moderation: str | None = None
    output_compression: int | None = None

    def request(self) -> ImageRequest:
        return ImageRequest(
            model=Catalog(MODELS).find("flux-1.1-pro"),  # adapters never look at our catalog entry
            prompt=self.prompt,
            width=self.width,
            height=self.height,
            n=self.n,
            quality=self.quality,
            style=self.style,
            seed=self.seed,
            safety_tolerance=self.safety_tolerance,
            output_format=self.output_format,
            background=self.background,
            moderation=self.moderation,
            output_compression=self.output_compression,
        )


async def run_adapter(
    build: Callable[[Upstream], Provider], base_url: str, job: Job, key: str = "test-key"
) -> list[GeneratedImage]:
    """One `generate` call through a fresh session, polling fast. The caller of an adapter owns the
    deadline; here it turns a poll loop that never ends into a failure."""
    async with open_session() as http, asyncio.timeout(10):
        return await build(Upstream(http, base_url, key, poll_interval=0.01)).generate(job.request(), job.model)


def ask(adapter: Provider, job: Job) -> Coroutine[Any, Any, list[GeneratedImage]]:
    """`adapter.generate` for a test's `Job`."""
    return adapter.generate(job.request(), job.model)
