"""Provider adapters: one module per upstream, each a class with one async `generate` method.

Adapters know their upstream's wire format and the two tiny types below, nothing about our
HTTP API, keys, storage or database. Each translates its upstream's failures into `qubax.errors`.
"""

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

from qubax.client import Client
from qubax.providers.pool import KeyPool
from qubax.slots import Slots


@dataclass(frozen=True)
class Job:
    """What to generate, in our terms; `model` is the upstream's own name for the model.

    `seed`, `safety_tolerance` and `output_format` are FLUX extensions a client may send; adapters pass
    them on where their upstream takes them and ignore them otherwise.
    """

    model: str
    prompt: str
    width: int
    height: int
    n: int
    quality: str | None = None
    style: str | None = None
    seed: int | None = None
    safety_tolerance: int | None = None
    output_format: str | None = None


@dataclass(frozen=True)
class GeneratedImage:
    """Image bytes as the upstream produced them (any format Pillow reads)."""

    data: bytes
    revised_prompt: str | None = None


class Upstream:
    """How to reach one provider: the shared HTTP client, where, and a pool of credentials."""

    def __init__(
        self,
        http: Client,
        base_url: str,
        keys: str | Sequence[str],
        poll_interval: float = 0.5,
        concurrency: int | None = None,
        slots: Slots | None = None,
        name: str = "",
    ) -> None:
        self.http = http
        self.base_url = base_url.rstrip("/")
        self.pool = KeyPool([keys] if isinstance(keys, str) else keys, concurrency, slots, f"upstream:{name}")
        self.poll_interval = poll_interval

    def lease(self) -> AbstractAsyncContextManager[str]:
        """A key with a free slot; hold it for the whole life of one upstream task or call."""
        return self.pool.lease()


class Provider(Protocol):
    async def generate(self, job: Job) -> list[GeneratedImage]: ...


@dataclass(frozen=True)
class ProviderInfo:
    """Registry entry: how to build the adapter and which settings configure it."""

    build: Callable[[Upstream], Provider]
    credential: str  # the environment variable operators set, e.g. BFL_API_KEY (comma-separated for a pool)
    key_field: str  # the Settings attribute holding it
    base_url_field: str
    concurrency: int | None = None  # active tasks each key may have at once (the upstream's own cap)


def aspect_ratio(width: int, height: int, choices: Sequence[str] | None = None) -> str:
    """The aspect ratio among `choices` (default: the standard FLUX ones, 21:9 … 9:21) nearest to width:height."""
    target = math.log(width / height)
    return min(choices or ASPECT_RATIOS, key=lambda r: abs(math.log(_ratio(r)) - target))


def _ratio(text: str) -> float:
    w, h = text.split(":")
    return int(w) / int(h)


ASPECT_RATIOS = ("21:9", "16:9", "3:2", "4:3", "5:4", "1:1", "4:5", "3:4", "2:3", "9:16", "9:21")
