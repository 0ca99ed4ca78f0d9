"""The built-in renderer that answers test keys: no upstream, no cost, deterministic output."""

import asyncio

from qubax.catalog import ImageRequest
from qubax.imaging import render_placeholder
from qubax.providers import GeneratedImage


class Placeholder:
    async def generate(self, request: ImageRequest, model: str) -> list[GeneratedImage]:
        # An edit: the first image, fitted, under the same test label.
        base = await asyncio.to_thread(request.images[0].read) if request.images else None
        images = []
        for index in range(request.n):
            size = (request.width, request.height)
            data = await asyncio.to_thread(render_placeholder, request.prompt, *size, index, base=base)
            images.append(GeneratedImage(data))
        return images
