"""The built-in renderer that answers test keys: no upstream, no cost, deterministic output."""

import asyncio
from typing import BinaryIO

from qubax.catalog import ImageRequest
from qubax.imaging import render_placeholder
from qubax.providers import GeneratedImage


class Placeholder:
    async def generate(self, request: ImageRequest, model: str) -> list[GeneratedImage]:
        images = []
        for index in range(request.n):
            if request.images:  # an edit: the first image, fitted, under the same test label
                first = request.images[0]
                data = await asyncio.to_thread(render_edit_placeholder, first.file, request, index)
            else:
                data = await asyncio.to_thread(render_placeholder, request.prompt, request.width, request.height, index)
            images.append(GeneratedImage(data))
        return images


def render_edit_placeholder(file: BinaryIO, request: ImageRequest, index: int) -> bytes:
    file.seek(0)
    return render_placeholder(request.prompt, request.width, request.height, index, base=file.read())
