"""The built-in renderer that answers test keys: no upstream, no cost, deterministic output."""

import asyncio

from qubax.imaging import render_placeholder
from qubax.providers import GeneratedImage, Job


class Placeholder:
    async def generate(self, job: Job) -> list[GeneratedImage]:
        images = []
        for index in range(job.n):
            data = await asyncio.to_thread(render_placeholder, job.prompt, job.width, job.height, index)
            images.append(GeneratedImage(data))
        return images
