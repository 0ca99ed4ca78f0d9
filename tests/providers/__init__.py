"""Helpers every adapter test shares."""

import asyncio
from collections.abc import Callable

from qubax.client import Client
from qubax.providers import GeneratedImage, Job, Provider, Upstream


async def run_adapter(
    build: Callable[[Upstream], Provider], base_url: str, job: Job, key: str = "test-key"
) -> list[GeneratedImage]:
    """One `generate` call through a fresh session, polling fast. The caller of an adapter owns the
    deadline; here it turns a poll loop that never ends into a failure."""
    async with Client() as http, asyncio.timeout(10):
        return await build(Upstream(http, base_url, key, poll_interval=0.01)).generate(job)
