"""The built-in renderer that answers test keys: no upstream, no cost, deterministic output."""

import asyncio
import functools

import pybase64

from qubax.pipeline.imaging import coarser, fitted, render_placeholder
from qubax.providers import GeneratedImage
from qubax.routing.request import ImageRequest, PartialImage


class Placeholder:
    async def generate(self, request: ImageRequest, model: str) -> list[GeneratedImage]:
        # An edit: the first image, fitted, under the same test label; one past the decoding budget is
        # left out, since a live key's route that sends it on as it is takes it too.
        fit = functools.partial(fitted, width=request.width, height=request.height)
        first = request.images[0] if request.images else None
        base = await first.decode(fit) if first is not None and first.decodable else None
        images = []
        for index in range(request.index, request.index + request.n):
            size = (request.width, request.height)
            data = await asyncio.to_thread(render_placeholder, request.prompt, *size, index, base=base)
            await send_partials(request, data, index)
            images.append(GeneratedImage(data))
        return images


async def send_partials(request: ImageRequest, data: bytes, index: int) -> None:
    """What a GPT image model's upstream sends a streamed answer before each image: the partial images
    asked for, coarse to fine. The other models send none (Gemini's are token-billed too, but its
    generateContent streams no partial image): a GPT image model is the one with their own parameters."""
    if request.partials is None or not request.model.backgrounds:
        return
    for step in range(request.partial_images):
        factor = 2 ** (request.partial_images - step + 1)  # three partials: blocks of 16, 8 and 4 pixels
        partial = await asyncio.to_thread(coarser, data, factor, request.output_format)
        request.partials.put_nowait(PartialImage(index, step, pybase64.b64encode_as_string(partial)))
