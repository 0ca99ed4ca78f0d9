"""The shutdown dates upstreams publish about their models (`routing.lifecycle.Published`), read as the
app starts and then daily: never on a request's path, and a failure to read is logged, never fatal (the
dates read before stay)."""

import asyncio
import logging
from datetime import date
from typing import Protocol, runtime_checkable

from qubax.server.services import Services

logger = logging.getLogger("qubax")
READ_EVERY_SECONDS = 24 * 3600


@runtime_checkable
class PublishesShutdowns(Protocol):
    """An adapter whose upstream lists its models' shutdown dates (OpenAI's)."""

    async def shutdown_dates(self) -> dict[str, date]: ...


async def read_forever(services: Services) -> None:
    while True:
        await read_published(services)
        await asyncio.sleep(READ_EVERY_SECONDS)


async def read_published(services: Services) -> None:
    """Each configured upstream's published shutdown dates, where it publishes them."""
    for name, provider in services.providers.items():
        if not isinstance(provider, PublishesShutdowns):
            continue
        try:
            dates = await provider.shutdown_dates()
        except Exception as exc:  # an upstream away, or an answer we cannot read: the next day may do better
            logger.warning("reading the shutdown dates %s publishes failed: %s", name, services.mask(str(exc)))
            continue
        services.published.update(name, dates)
        logger.info("read %d shutdown dates %s publishes", len(dates), name)
