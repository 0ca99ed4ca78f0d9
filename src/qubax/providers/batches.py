"""Work split over several upstream calls (a provider makes so many images a call), and what they made."""

import asyncio
from collections.abc import Awaitable, Iterable

from qubax.errors import TaskFailed, UpstreamError
from qubax.providers import GeneratedImage


def batch_sizes(n: int, most: int) -> list[int]:
    """`n` images as calls of at most `most` images each: 10 by 4 is [4, 4, 2]."""
    return [min(most, n - start) for start in range(0, n, most)]


def whole_batch(images: list[GeneratedImage], asked: int, provider: str) -> list[GeneratedImage]:
    """A call's images, when it made all it was asked for. A batch that came back short (a safety
    checker drops the images it flags) fails with the images it holds: they are kept (and billed),
    and the rest can be made elsewhere."""
    if len(images) < asked:
        error = TaskFailed(f"{provider} returned {len(images)} of the {asked} images asked for.")
        error.images = images
        raise error
    return images


async def fan_out(calls: Iterable[Awaitable[list[GeneratedImage]]]) -> list[GeneratedImage]:
    """Run calls concurrently, to the end: an image one call made survives a sibling's failure.

    When any call failed, raise the most decisive failure (a refusal before an upstream error, one that
    forbids failover before one that allows it), carrying the images the other calls made.
    """
    pending = list(calls)
    if len(pending) == 1:  # the common n=1 case: no gather, no extra task
        return await pending[0]
    results = await asyncio.gather(*pending, return_exceptions=True)
    images = [image for result in results if isinstance(result, list) for image in result]
    errors = [result for result in results if isinstance(result, BaseException)]
    if not errors:
        return images
    error = min(errors, key=decisiveness)
    if isinstance(error, UpstreamError):
        # Calls that failed part-way (a batch short of images) keep what they made too.
        error.images = images + [image for e in errors if isinstance(e, UpstreamError) for image in e.images]
    raise error


def decisiveness(error: BaseException) -> int:
    """Lower wins: refusals and crashes, then failures that forbid failover, then the rest."""
    if not isinstance(error, UpstreamError):
        return 0
    return 2 if error.failover else 1
