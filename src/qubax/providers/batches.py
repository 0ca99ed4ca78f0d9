"""Work split over several upstream calls (a provider makes so many images a call), and what they made."""

import asyncio
from collections.abc import Awaitable, Iterable

from qubax.errors import UpstreamError
from qubax.providers import GeneratedImage


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
