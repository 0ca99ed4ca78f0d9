"""The built-in renderer that answers test keys: no upstream, no cost, deterministic output."""

import asyncio

from qubax.catalog import ImageRequest
from qubax.imaging import render_placeholder
from qubax.providers import GeneratedImage


class Placeholder:
    async def generate(self, request: ImageRequest, model: str) -> list[GeneratedImage]:
        images = []
        for index in range(request.n):
            data = await asyncio.to_thread(render_placeholder, request.prompt, request.width, request.height, index)
            images.append(GeneratedImage(data))
        return images
