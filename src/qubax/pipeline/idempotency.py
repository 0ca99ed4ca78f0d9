"""`Idempotency-Key`: a request sent again with the same key (a client's or an SDK's retry) gets the first
one's answer, not new upstream work and a second charge.

A request with a key claims it in the database (one row per API key and idempotency key, shared by every
node) before any work. The first to claim it does the work, saying every few seconds that it is still at
it; the answer of a success is stored with the row and replayed for 24 hours, and so is a refusal that
the same request would meet again (`QubaxError.deterministic`: content policy, an upstream's 400). Any
other failure (which costs nothing) may pass: it lets go of the key, so that a retry does the work anew.
The work goes on when its client leaves (its retry will want the answer). A retry that finds the work
still going waits for it, on whichever node it lands; one that finds it abandoned (its node died) takes
it over, and waits on the upstream tasks the dead node had started (`journal`) rather than starting them
again.

This wraps the pipeline from outside: the owner runs `delivery.run` with the claim's charge identity
(`claims.usage_id`), whatever the delivery; the rows themselves are `claims`'.
"""

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, BinaryIO

import orjson
from fastapi.sse import KEEPALIVE_COMMENT

from qubax.errors import IdempotencyKeyReused, InProgress, InvalidRequest, QubaxError
from qubax.pipeline import delivery
from qubax.pipeline.claims import claim, find, keep, let_go, touch, usage_id
from qubax.pipeline.delivery import Answer
from qubax.pipeline.work import Work
from qubax.records import journal, tables
from qubax.records.storage import Storage, relink
from qubax.server.services import Services

HEADER = "idempotency-key"
MAX_KEY_CHARS = 255
WAIT_SECONDS = 0.2  # between looks at a request another node is working on
REPLAYED_HEADERS = ("content-type", "x-qubax-route", "x-qubax-test", "x-should-retry")
COMPLETED = b".completed"  # in the event name of each image a stream delivered


def fingerprint(kind: str, fields: dict[str, object], files: list[bytes] | None = None) -> str:
    """What makes two requests the same request: the endpoint, the fields sent, and the files' digests."""
    digest = hashlib.sha256(kind.encode() + b"\0" + orjson.dumps(fields, option=orjson.OPT_SORT_KEYS))
    for file in files or ():
        digest.update(b"\0" + file)
    return digest.hexdigest()


async def fingerprint_of(work: Work) -> str:
    """The work's fingerprint: its endpoint, its fields and its files' digests (read in a worker thread)."""
    request = work.request
    files = [*request.images, *filter(None, [request.mask])]
    digests = await asyncio.to_thread(lambda: [digest(file.rewind()) for file in files])
    return fingerprint(work.endpoint, work.fields(), digests)


def digest(file: BinaryIO) -> bytes:
    found = hashlib.sha256()
    while chunk := file.read(1024 * 1024):
        found.update(chunk)
    return found.digest()


def check_key(token: str) -> str:
    if not token or len(token) > MAX_KEY_CHARS:
        raise InvalidRequest(
            f"The Idempotency-Key header must be 1 to {MAX_KEY_CHARS} characters long.",
            code="invalid_idempotency_key",
        )
    return token


async def once(work: Work, services: Services, token: str) -> Answer:
    """The pipeline's answer to the work, made at most once at a time for this key (`run` or
    `run_stream`, by whichever request owns the key), and replayed once it succeeded."""
    key_id, print_ = work.key.id, await fingerprint_of(work)
    deadline = time.monotonic() + services.settings.request_timeout_seconds
    while True:
        if (claimed := await claim(services.sessions, key_id, token, print_)) is not None:
            return await owned(charged_as(work, claimed), services, token)
        row = await find(services.sessions, key_id, token)
        if row is None:  # the first request failed and let go: this one does the work
            continue
        if row.fingerprint != print_:
            raise IdempotencyKeyReused(
                "This Idempotency-Key was already used with a different request; use a new key for a new request."
            )
        if row.status == "done":
            return await replay(row, services.storage, work.public_url)
        # A claim whose worker has gone silent (its node died) is taken over; of several nodes, one wins.
        if await touch(services.sessions, key_id, token, silent_for=services.settings.takeover_seconds):
            return await owned(charged_as(work, row), services, token)
        if time.monotonic() > deadline:
            raise InProgress(
                "The request with this Idempotency-Key is still at work; try again shortly.", retry_after=1
            )
        await asyncio.sleep(WAIT_SECONDS)


async def owned(work: Work, services: Services, token: str) -> Answer:
    """The work done as the key's owner; it goes on if the client leaves (its retry will want the answer)."""
    if work.delivery == "stream":
        return await run_stream(work, services, token)
    answer: Answer | None = await asyncio.shield(detach(services, own(work, services, token)))
    assert answer is not None  # only a stream may have nothing to keep
    return answer


async def run_stream(work: Work, services: Services, token: str) -> Answer:
    """A streamed answer as the key's owner: the events are made by work that goes on if the client
    leaves, sent to the client as they come, and kept, all together, as the answer to replay."""
    relay = Relay()
    detach(services, own(work, services, token, relay)).add_done_callback(relay.ended)
    return Answer(headers=await asyncio.shield(relay.opened), events=relay.events())


async def relayed(work: Work, services: Services, relay: "Relay") -> Answer | None:
    """The stream's events handed to the relay; all of them together, when an image was delivered."""
    try:
        answer = await delivery.run(work, services)
    except Exception as exc:  # refused before it started (limits): the client gets the error
        relay.opened.set_exception(exc)
        return None
    relay.opened.set_result(answer.headers)
    assert answer.events is not None  # a stream's
    kept = []
    try:
        async for event in answer.events:
            relay.put(event)
            if event != KEEPALIVE_COMMENT:
                kept.append(event)
    finally:
        relay.close()
    # With no image sent, nothing was charged: a retry may make them anew.
    if not any(COMPLETED in event for event in kept):
        return None
    return Answer(b"".join(kept), headers=answer.headers | {"content-type": "text/event-stream; charset=utf-8"})


class Relay:
    """Events handed from the work that makes them to the client that reads them, at its own pace."""

    def __init__(self) -> None:
        self.opened: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()
        self.events_so_far: list[bytes] = []
        self.changed = asyncio.Event()
        self.closed = False

    def ended(self, task: "asyncio.Task[Answer | None]") -> None:
        if not self.opened.done():  # it failed before the stream could start (the database, say)
            failure = None if task.cancelled() else task.exception()
            self.opened.set_exception(failure or QubaxError("The streamed request stopped before it started."))

    def put(self, event: bytes) -> None:
        self.events_so_far.append(event)
        self.changed.set()

    def close(self) -> None:
        self.closed = True
        self.changed.set()

    async def events(self) -> AsyncIterator[bytes]:
        sent = 0
        while True:
            while sent < len(self.events_so_far):
                sent += 1
                yield self.events_so_far[sent - 1]
            if self.closed:
                return
            self.changed.clear()
            await self.changed.wait()


def detach(services: Services, work: Awaitable[Any]) -> "asyncio.Task[Any]":
    """Run work that outlives its request, held where the event loop's weak references cannot lose it."""
    task = asyncio.ensure_future(work)
    services.detached.add(task)
    task.add_done_callback(services.detached.discard)
    return task


def charged_as(work: Work, claimed: tables.IdempotentRequest) -> Work:
    """The work, its usage record charged as the key's claim (`claims.usage_id`): the same record for a
    node that takes the claim over."""
    return dataclasses.replace(work, charge_id=usage_id(claimed))


async def own(work: Work, services: Services, token: str, relay: Relay | None = None) -> Answer | None:
    """Store a success's answer, or a deterministic refusal's; let go of the key otherwise (a failure
    that may pass, or work that has nothing worth keeping). The work's usage record is charged as the
    claim (`charged_as`); upstream tasks it starts are noted in the journal, where a takeover finds them."""
    key_id = work.key.id
    beating = asyncio.create_task(heartbeat(services, key_id, token))
    try:
        async with journal.kept(services.sessions, journal.request_owner(key_id, token)):
            answer = await (delivery.run(work, services) if relay is None else relayed(work, services, relay))
    except BaseException as exc:
        if isinstance(exc, QubaxError) and exc.deterministic:
            await asyncio.shield(keep(services.sessions, key_id, token, *refusal(exc)))
        else:
            await asyncio.shield(let_go(services.sessions, key_id, token))
        raise
    finally:
        beating.cancel()
    if answer is None or answer.status >= 300:
        await let_go(services.sessions, key_id, token)
        return answer
    await keep(services.sessions, key_id, token, answer.status, replayed(answer.headers), answer.body)
    return answer


def refusal(error: QubaxError) -> tuple[int, dict[str, str], bytes]:
    """The error's answer, as `app` renders it, to keep."""
    headers = replayed(error.headers | {"content-type": "application/json"})
    return error.status_code, headers, error.to_body().model_dump_json().encode()


def replayed(headers: dict[str, str]) -> dict[str, str]:
    return {name: value for name, value in headers.items() if name in REPLAYED_HEADERS}


async def heartbeat(services: Services, key_id: str, token: str) -> None:
    while True:
        await asyncio.sleep(services.settings.takeover_seconds / 4)
        with contextlib.suppress(Exception):  # a missed beat only risks a takeover, never the work
            await touch(services.sessions, key_id, token)


async def replay(row: tables.IdempotentRequest, storage: Storage, public_url: str) -> Answer:
    """The stored answer, its image links signed anew (the first ones may have expired)."""
    body = row.response_body or b""
    if b'"url"' in body:
        answer = orjson.loads(body)
        await relink(answer, storage, public_url)
        body = orjson.dumps(answer)
    headers = json.loads(row.response_headers or "{}") | {"x-qubax-idempotent-replayed": "true"}
    return Answer(body, row.response_status or 200, headers)
