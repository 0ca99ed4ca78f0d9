"""API keys: random tokens we show once and store only as SHA-256 digests."""

import asyncio
import hashlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")

LIVE_PREFIX = "qbx_live_"
TEST_PREFIX = "qbx_test_"
DISPLAY_CHARS = 4  # of the secret part, shown in listings next to the prefix


@dataclass(frozen=True)
class NewKey:
    secret: str  # the full key; exists only until it is printed
    prefix: str
    digest: str
    test: bool


def digest_key(key: str) -> str:
    # A fast hash is enough: keys carry 256 bits of entropy, so there is nothing to brute-force.
    return hashlib.sha256(key.encode()).hexdigest()


def new_key(*, test: bool) -> NewKey:
    secret = (TEST_PREFIX if test else LIVE_PREFIX) + secrets.token_urlsafe(32)
    return NewKey(secret, display_prefix(secret), digest_key(secret), test)


def display_prefix(key: str) -> str:
    head = TEST_PREFIX if key.startswith(TEST_PREFIX) else LIVE_PREFIX
    return key[: len(head) + DISPLAY_CHARS]


def bearer_token(header: str) -> str:
    """The credential of an `Authorization: Bearer …` header; empty for any other scheme or none."""
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def looks_like_key(text: str) -> bool:
    return text.startswith((LIVE_PREFIX, TEST_PREFIX))


def masked(key: str) -> str:
    """What error messages may echo of a wrong key (as OpenAI does: `sk-abc***`)."""
    return key[: len(LIVE_PREFIX) + 3] + "***" if looks_like_key(key) else key[:3] + "***"


class KeyCache(Generic[T]):
    """Recent key lookups by digest (misses too), so a busy key costs one query per `ttl` seconds.

    Revocation, and a key created on another node, take effect within `ttl` on every node. Not async-lru:
    it arms a timer per entry and costs ~3x on a hit (bench/README.md, "Home-made parts and libraries").
    """

    def __init__(self, ttl: float = 1.0, size: int = 10_000) -> None:
        self.ttl = ttl
        self.size = size
        # Least recently used first: a flood of unknown keys pushes out old entries, not the busy ones.
        self.entries: OrderedDict[str, tuple[float, T | None]] = OrderedDict()
        self.loading: dict[str, asyncio.Future[T | None]] = {}

    async def fetch(self, digest: str, load: Callable[[], Awaitable[T | None]]) -> T | None:
        """The key (or None) for `digest`, from the cache or from `load()`. Requests that miss together
        share one load: when a busy key's entry expires, every request in flight misses at once, and
        each running its own query was measurably dearer (bench/README.md)."""
        found, key = self.get(digest)
        if found:
            return key
        loading = self.loading.get(digest)
        if loading is None:
            loading = self.loading[digest] = asyncio.ensure_future(self.load(digest, load))
            loading.add_done_callback(ignore_failure)  # its waiters hear of a failure; none may be left
        # Shielded: one waiter giving up (its client left) must not cancel the others' lookup.
        return await asyncio.shield(loading)

    async def load(self, digest: str, load: Callable[[], Awaitable[T | None]]) -> T | None:
        try:
            key = await load()
        finally:
            del self.loading[digest]
        self.put(digest, key)
        return key

    def get(self, digest: str) -> tuple[bool, T | None]:
        """(found, key-or-None); found is False when the lookup must go to the database."""
        entry = self.entries.get(digest)
        if entry is None or time.monotonic() - entry[0] > self.ttl:
            return False, None
        self.entries.move_to_end(digest)
        return True, entry[1]

    def put(self, digest: str, key: T | None) -> None:
        self.entries[digest] = (time.monotonic(), key)
        self.entries.move_to_end(digest)
        if len(self.entries) > self.size:  # bounded: a flood of random keys cannot grow memory
            self.entries.popitem(last=False)

    def forget(self, digest: str) -> None:
        """Drop a key that just changed, so this node's next lookup reads it afresh."""
        self.entries.pop(digest, None)


def ignore_failure(future: "asyncio.Future[Any]") -> None:
    if not future.cancelled():
        future.exception()
