"""Provider adapters: one module per upstream, each a class with one async `generate` method.

Adapters know their upstream's wire format and the checked `ImageRequest`, nothing about our HTTP
API, keys, storage or database. Adding a provider is one module (its adapter, a subclass of
`adapter.Adapter`, and its `INFO`), one line in `registry.PROVIDERS`, one fake and one test file. Each
translates its upstream's failures into `qubax.errors`.

The plumbing they share, one module a concern: `transport` (the one session, sending), `replies` (an
answer read within its cap), `events` (server-sent events), `failures` (what a status means),
`polling` (accepted work: noted, resumed, polled, cancelled), `batches` (work split over calls),
`hosts` (where an upstream's URL may take the key) and `deliveries` (image bytes, inline or downloaded).
"""

import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol

from qubax.limits.slots import Slots
from qubax.protocol import Usage
from qubax.providers.callbacks import Callbacks
from qubax.providers.pool import KeyPool
from qubax.providers.transport import Http
from qubax.routing.request import ImageRequest


@dataclass(frozen=True)
class GeneratedImage:
    """Image bytes as the upstream produced them (any format Pillow reads)."""

    data: bytes
    revised_prompt: str | None = None
    # GPT image models: the upstream's token count for the call that made this image and its siblings
    # (on the first of them only), and what it made of settings asked as `auto` (`quality`, `background`).
    tokens: "Tokens | None" = None
    settings: Mapping[str, str] = field(default_factory=dict)
    # The upstream's own base64 text of `data`, where it sent one (bytes when cut from its JSON answer:
    # `payload`): an image that passes through unchanged is answered with it, not encoded again.
    b64: str | bytes | None = None


@dataclass(frozen=True)
class Tokens:
    """What one upstream call spent: its token count, and the upstream model whose rates price it."""

    model: str
    usage: Usage


class Upstream:
    """How to reach one provider: the shared HTTP session, where, a pool of credentials, the hosts its
    results may be downloaded from (besides the base URL's own origin: `hosts.trusted`), and where its
    tasks call us back when they end (`callbacks`)."""

    def __init__(
        self,
        http: Http,
        base_url: str,
        keys: str | Sequence[str],
        poll_interval: float = 0.5,
        concurrency: int | None = None,
        slots: Slots | None = None,
        name: str = "",
        delivery_hosts: Sequence[str] = (),
        callbacks: Callbacks | None = None,
    ) -> None:
        self.http = http
        self.base_url = base_url.rstrip("/")
        keys = [keys] if isinstance(keys, str) else keys
        self.pool = KeyPool(keys, concurrency, slots, f"upstream:{name}", http.waited)
        self.poll_interval = poll_interval
        self.delivery_hosts = tuple(delivery_hosts)
        self.callbacks = callbacks  # tasks' callbacks to us, where the upstream has them and they are on

    def lease(self, task: Mapping[str, Any] | None = None) -> AbstractAsyncContextManager[str]:
        """A key with a free slot (for a `task` taken up again from the journal, the key that started it);
        hold it for the whole life of one upstream task or call."""
        return self.pool.lease(None if task is None else task["key"])

    def key_name(self, key: str) -> str:
        """The leased key's name, to note with a task in place of the key itself."""
        return self.pool.name_of(key)


class TaskJournal(Protocol):
    """Where an adapter notes work its upstream accepted, before waiting on it, so that a node taking over
    from one that died waits on that work instead of paying for it again (`qubax.journal`). An adapter
    finds it in `journal`, set for a job or an idempotent request; plain requests have none."""

    def take(self, provider: str, model: str, count: int) -> dict[str, Any] | None:
        """A task noted earlier for `count` images of `model`, not yet taken up again."""
        ...

    async def record(self, provider: str, model: str, count: int, handle: dict[str, Any]) -> None: ...


journal: ContextVar[TaskJournal | None] = ContextVar("qubax_task_journal", default=None)


class Provider(Protocol):
    async def generate(self, request: ImageRequest, model: str) -> list[GeneratedImage]:
        """`request.n` images of the upstream's `model`, or an `UpstreamError` carrying those it made."""
        ...


@dataclass(frozen=True)
class ProviderInfo:
    """What a provider module declares about itself (its `INFO`); `registry.PROVIDERS` lists them."""

    name: str  # in catalog routes, metrics and QUBAX_<NAME>_BASE_URL, e.g. "bfl"
    build: Callable[[Upstream], Provider]
    credential: str  # the variable operators set, e.g. BFL_API_KEY (comma-separated for a pool)
    base_url: str  # the default; QUBAX_<NAME>_BASE_URL overrides it
    concurrency: int | None = None  # active tasks each key may have at once (the upstream's own cap)
    delivery_hosts: tuple[str, ...] = ()  # shell-style patterns of the hosts results are downloaded from
    callbacks: bool = False  # whether its tasks can call us back when they end (`callbacks`)

    @property
    def base_url_variable(self) -> str:
        return f"QUBAX_{self.name.upper()}_BASE_URL"


def aspect_ratio(width: int, height: int, choices: Sequence[str] | None = None) -> str:
    """The aspect ratio among `choices` (default: the standard FLUX ones, 21:9 … 9:21) nearest to width:height."""
    target = math.log(width / height)
    return min(choices or ASPECT_RATIOS, key=lambda r: abs(math.log(_ratio(r)) - target))


def _ratio(text: str) -> float:
    w, h = text.split(":")
    return int(w) / int(h)


ASPECT_RATIOS = ("21:9", "16:9", "3:2", "4:3", "5:4", "1:1", "4:5", "3:4", "2:3", "9:16", "9:21")
