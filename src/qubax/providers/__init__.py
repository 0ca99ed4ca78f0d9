"""Provider adapters: one module per upstream, each a class with one async `generate` method.

Adapters know their upstream's wire format and the two tiny types below, nothing about our
HTTP API, keys, storage or database. Each translates its upstream's failures into `qubax.errors`.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import httpx


@dataclass(frozen=True)
class Job:
    """What to generate, in our terms; `model` is the upstream's own name for the model."""

    model: str
    prompt: str
    width: int
    height: int
    n: int
    quality: str | None = None
    style: str | None = None


@dataclass(frozen=True)
class GeneratedImage:
    """Image bytes as the upstream produced them (any format Pillow reads)."""

    data: bytes
    revised_prompt: str | None = None


@dataclass(frozen=True)
class Upstream:
    """How to reach one provider: the shared HTTP client, where, with which credential."""

    http: httpx.AsyncClient
    base_url: str
    api_key: str
    poll_interval: float = 0.5


class Provider(Protocol):
    async def generate(self, job: Job) -> list[GeneratedImage]: ...


@dataclass(frozen=True)
class ProviderInfo:
    """Registry entry: how to build the adapter and which settings configure it."""

    build: Callable[[Upstream], Provider]
    credential: str  # the environment variable operators set, e.g. BFL_API_KEY
    key_field: str  # the Settings attribute holding it
    base_url_field: str


def aspect_ratio(width: int, height: int) -> str:
    """The standard FLUX aspect ratio (21:9 … 9:21) nearest to width:height."""
    target = math.log(width / height)
    return min(ASPECT_RATIOS, key=lambda r: abs(math.log(_ratio(r)) - target))


def _ratio(text: str) -> float:
    w, h = text.split(":")
    return int(w) / int(h)


ASPECT_RATIOS = ("21:9", "16:9", "3:2", "4:3", "5:4", "1:1", "4:5", "3:4", "2:3", "9:16", "9:21")
