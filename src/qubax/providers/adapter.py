"""The base of every provider's adapter: its upstream, and the shared plumbing bound to that upstream
and to the provider's names, so that an adapter module says only what is its provider's own."""

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple, TypeVar

from qubax.providers import GeneratedImage, Upstream
from qubax.providers.deliveries import decode_b64, download
from qubax.providers.failures import check_status
from qubax.providers.hosts import trusted
from qubax.providers.polling import accepted, cancel_quietly, poll, resumable
from qubax.providers.replies import Reply, read_json
from qubax.providers.transport import send

T = TypeVar("T")


class Callback(NamedTuple):
    """Where a task's upstream calls us when it ends: the task's fresh reference (noted in its handle),
    and the URL to give the upstream."""

    ref: str
    url: str


class Adapter:
    """A subclass names its provider and adds `generate` (the `Provider` protocol)."""

    name: ClassVar[str]  # as in the registry and the task journal, e.g. "bfl"
    label: ClassVar[str]  # as our messages say it, e.g. "Black Forest Labs"

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream

    async def send(self, method: str, url: str, **kwargs: Any) -> Reply:
        """One request on the app's upstream session; `kwargs` go to `transport.send`."""
        return await send(self.upstream.http, self.label, method, url, **kwargs)

    def checked_json(self, response: Reply) -> dict[str, Any]:
        """The JSON object of a successful answer; raise the error any other answer means (an adapter
        handles its provider's quirks before)."""
        check_status(response, self.label)
        return read_json(response, self.label)

    def trusted(self, url: Any, hosts: Sequence[str]) -> bool:
        """Whether a URL the upstream handed us may get our key or be downloaded: on one of `hosts`
        (shell-style patterns, https only) or at the configured base URL's own origin."""
        return isinstance(url, str) and trusted(url, hosts, self.upstream.base_url)

    def decode_b64(self, text: Any) -> bytes:
        """Image bytes from an inline base64 field."""
        return decode_b64(text, self.label)

    def inline_image(self, text: Any, **fields: Any) -> GeneratedImage:
        """An image the upstream sent inline as base64, its text kept (`GeneratedImage.b64`)."""
        return GeneratedImage(self.decode_b64(text), b64=text, **fields)

    async def download(self, url: Any) -> bytes:
        """Image bytes from a result URL, only from where the provider delivers from."""
        return await download(self.upstream, self.label, url)

    def resumable(self, model: str, count: int) -> dict[str, Any] | None:
        """A task for this work that a node which died had started: to be waited on, not made again."""
        return resumable(self.name, model, count)

    async def accepted(self, key: str, model: str, count: int, handle: dict[str, Any]) -> None:
        """Note a task the upstream accepted under `key`, before anyone waits on it."""
        await accepted(self.upstream, key, self.name, model, count, handle)

    def callback(self) -> Callback | None:
        """A fresh reference for a task about to be submitted, to note in its handle, and the URL its
        upstream is to call when it ends; None when callbacks are off (`QUBAX_PUBLIC_URL` unset)."""
        callbacks = self.upstream.callbacks
        if callbacks is None:
            return None
        ref = callbacks.new()
        return Callback(ref, callbacks.url(self.name, ref))

    async def poll(self, check: Callable[[], Awaitable[T | None]], callback: str | None = None) -> T:
        """Call `check` until it returns a value (`polling.poll`): at the upstream's poll interval, or, for
        a task submitted with the `callback` reference, when the callback comes or the slow poll is due."""
        callbacks = self.upstream.callbacks
        if callback is None or callbacks is None:
            return await poll(check, self.upstream.poll_interval)
        with callbacks.waiting(callback) as woken:
            return await poll(check, self.upstream.poll_interval, woken, callbacks.poll_seconds)

    async def cancel(self, method: str, url: str, headers: Mapping[str, str]) -> None:
        """Best-effort cancel of upstream work nobody will collect (`polling.cancel_quietly`)."""
        await cancel_quietly(self.upstream.http, method, url, headers)
