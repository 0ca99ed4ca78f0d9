"""Upstream callbacks: BFL, fal and Replicate call us when a task ends, so that it is checked once,
then, instead of every poll interval while it runs.

Each task gets a fresh random reference, noted in its journal handle so that a node taking the task
over waits on the same one, and a callback URL that carries an HMAC of the provider and reference made
with the URL-signing secret every node shares: any node verifies a callback without a lookup. A callback
is only a signal to look now, never read as the task's outcome. It wakes the waiter on this node, or,
through Redis (`QUBAX_REDIS_URL`), on whichever node holds it; without Redis, or when a callback is lost,
the slow poll (`QUBAX_CALLBACK_POLL_SECONDS`) finds the task ended a little later.
"""

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import secrets
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

from qubax.addresses import public

if TYPE_CHECKING:
    from redis.asyncio import Redis

logger = logging.getLogger(__name__)
PATH = "/v1/upstream-callbacks"
CHANNEL = "qubax:upstream-callbacks"  # every node listens; the one holding the waiter wakes it
RECONNECT_SECONDS = 1.0
PUBLISH_SECONDS = 2.0
PRIVATE_SUFFIXES = (".localhost", ".local", ".internal", ".lan", ".home.arpa")  # never on the internet


class Callbacks:
    """This node's callback URLs and the tasks waiting on them."""

    def __init__(self, public_url: str, secret: bytes, poll_seconds: float) -> None:
        self.public_url = public_url.rstrip("/")
        self.secret = secret
        self.poll_seconds = poll_seconds  # the slow poll that covers a lost callback
        self.waiters: dict[str, asyncio.Event] = {}
        self.redis: Redis | None = None

    def new(self) -> str:
        return secrets.token_urlsafe(16)

    def url(self, provider: str, ref: str) -> str:
        return f"{self.public_url}{PATH}/{provider}/{ref}/{self.signature(provider, ref)}"

    def signature(self, provider: str, ref: str) -> str:
        digest = hmac.new(self.secret, f"upstream-callback\0{provider}\0{ref}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def verified(self, provider: str, ref: str, signature: str) -> bool:
        return hmac.compare_digest(self.signature(provider, ref).encode(), signature.encode())

    @contextlib.contextmanager
    def waiting(self, ref: str) -> Iterator[asyncio.Event]:
        """An event set when the task's callback arrives, at this node or another."""
        event = self.waiters[ref] = asyncio.Event()
        try:
            yield event
        finally:  # unless a later waiter on the same task (one taking it over) has replaced it
            if self.waiters.get(ref) is event:
                del self.waiters[ref]

    async def wake(self, ref: str) -> None:
        """Wake the task waiting on `ref`: here, or on the node that holds it."""
        if self.woken(ref) or self.redis is None:
            return
        from redis.exceptions import RedisError  # the `redis` extra: only with QUBAX_REDIS_URL

        try:  # bounded: the upstream waits for our answer, and Redis may hang
            await asyncio.wait_for(self.redis.publish(CHANNEL, ref), PUBLISH_SECONDS)
        except (RedisError, TimeoutError) as exc:  # the slow poll still finds the task ended
            logger.warning("could not pass an upstream callback on through Redis: %s", exc)

    def woken(self, ref: str) -> bool:
        event = self.waiters.get(ref)
        if event is not None:
            event.set()
        return event is not None

    async def listen_forever(self, redis: "Redis") -> None:
        """Wake this node's waiters for the callbacks other nodes received."""
        from redis.exceptions import RedisError

        while True:
            try:
                async with redis.pubsub() as pubsub:
                    await pubsub.subscribe(CHANNEL)
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            self.woken(message["data"].decode())
            except (RedisError, OSError) as exc:
                logger.warning("upstream callbacks from other nodes: Redis failed (%s); reconnecting", exc)
                await asyncio.sleep(RECONNECT_SECONDS)


def reachable(public_url: str | None, asked: bool | None = None) -> str | None:
    """The base of callback URLs: `public_url`, unless the operator said no (`asked` False) or, left to
    us, it names a host no upstream could call: a deployment reached only from inside would otherwise
    wait the slow poll out on every task."""
    if not public_url or asked is False:
        return None
    host = urllib.parse.urlsplit(public_url).hostname or ""
    if asked:
        return public_url
    try:
        return public_url if public(host.strip("[]")) else None
    except ValueError:  # a name, not an address
        pass
    inside = "." not in host.rstrip(".") or host.endswith(PRIVATE_SUFFIXES)  # "localhost", "qubax", "x.local"
    return None if inside else public_url


@contextlib.asynccontextmanager
async def open_callbacks(
    public_url: str | None, secret: bytes, poll_seconds: float, redis_url: str | None
) -> AsyncIterator[Callbacks | None]:
    """Callbacks at `public_url` (None without one: tasks are polled), shared through Redis when set."""
    if not public_url:
        yield None
        return
    callbacks = Callbacks(public_url, secret, poll_seconds)
    if redis_url is None:
        yield callbacks
        return
    from redis.asyncio import Redis  # the `redis` extra: only when asked for

    # A client of its own: a subscriber blocks on its connection with no read timeout.
    redis = Redis.from_url(redis_url, health_check_interval=30)  # a silently dead link is noticed
    listener = asyncio.create_task(callbacks.listen_forever(redis))
    callbacks.redis = redis
    try:
        yield callbacks
    finally:
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener
        await redis.aclose()
