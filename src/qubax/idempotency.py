"""`Idempotency-Key`: a request sent again with the same key (a client's or an SDK's retry) gets the first
one's answer, not new upstream work and a second charge.

A request with a key claims it in the database (one row per API key and idempotency key, shared by every
node) before any work. The first to claim it does the work, saying every few seconds that it is still at
it; the answer of a success is stored with the row and replayed for 24 hours, and so is a refusal that
the same request would meet again (`QubaxError.deterministic`: content policy, an upstream's 400). Any
other failure (which costs nothing) may pass: it lets go of the key, so that a retry does the work anew.
The work goes on when its client leaves (its
retry will want the answer). A retry that finds the work still going waits for it, on whichever node it
lands; one that finds it abandoned (its node died) takes it over, and waits on the upstream tasks the dead
node had started (`journal`) rather than starting them again.
"""

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import Response
from fastapi.sse import KEEPALIVE_COMMENT
from sqlalchemy import delete, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.sql.elements import ColumnElement

from qubax import db, journal, ledger
from qubax.errors import IdempotencyKeyReused, InProgress, InvalidRequest, QubaxError
from qubax.storage import Storage, relink

if TYPE_CHECKING:  # services imports this module, for the sweep
    from qubax.services import Services

HEADER = "idempotency-key"
MAX_KEY_CHARS = 255
LIFETIME = timedelta(hours=24)
WAIT_SECONDS = 0.2  # between looks at a request another node is working on
REPLAYED_HEADERS = ("content-type", "x-qubax-route", "x-qubax-test", "x-should-retry")
COMPLETED = b".completed"  # in the event name of each image a stream delivered
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def fingerprint(kind: str, fields: dict[str, object], files: list[bytes] | None = None) -> str:
    """What makes two requests the same request: the endpoint, the fields sent, and the files' digests."""
    digest = hashlib.sha256(kind.encode() + b"\0" + orjson.dumps(fields, option=orjson.OPT_SORT_KEYS))
    for file in files or ():
        digest.update(b"\0" + file)
    return digest.hexdigest()


def check_key(token: str) -> str:
    if not token or len(token) > MAX_KEY_CHARS:
        raise InvalidRequest(
            f"The Idempotency-Key header must be 1 to {MAX_KEY_CHARS} characters long.",
            code="invalid_idempotency_key",
        )
    return token


async def once(
    services: "Services",
    key_id: str,
    token: str,
    print_: str,
    owned: Callable[[], Awaitable[Response]],
    public_url: str,
) -> Response:
    """The answer `owned()` gives once this request owns the key (`run` or `run_stream` it), made at most
    once at a time for this key, and replayed once it succeeded."""
    deadline = time.monotonic() + services.settings.request_timeout_seconds
    while True:
        if await claim(services, key_id, token, print_):
            return await owned()
        row = await find(services, key_id, token)
        if row is None:  # the first request failed and let go: this one does the work
            continue
        if row.fingerprint != print_:
            raise IdempotencyKeyReused(
                "This Idempotency-Key was already used with a different request; use a new key for a new request."
            )
        if row.status == "done":
            return await replay(row, services.storage, public_url)
        if await take_over(services, key_id, token):
            return await owned()
        if time.monotonic() > deadline:
            raise InProgress(
                "The request with this Idempotency-Key is still at work; try again shortly.", retry_after=1
            )
        await asyncio.sleep(WAIT_SECONDS)


async def claim(services: "Services", key_id: str, token: str, print_: str) -> bool:
    """Whether this request now owns the key (an expired claim is cleared first)."""
    now = db.now()
    async with services.sessions() as session:
        expired = row_of(key_id, token) & (db.IdempotentRequest.expires_at < now)
        await session.execute(delete(db.IdempotentRequest).where(expired))
        session.add(
            db.IdempotentRequest(
                key_id=key_id,
                idempotency_key=token,
                fingerprint=print_,
                status="running",
                created_at=now,
                heartbeat_at=now,
                expires_at=now + LIFETIME,
            )
        )
        try:
            await session.commit()
        except IntegrityError:
            return False
    return True


def row_of(key_id: str, token: str) -> ColumnElement[bool]:
    """The one row of an API key's Idempotency-Key."""
    return (db.IdempotentRequest.key_id == key_id) & (db.IdempotentRequest.idempotency_key == token)


async def find(services: "Services", key_id: str, token: str) -> db.IdempotentRequest | None:
    async with services.sessions() as session:
        return await session.get(db.IdempotentRequest, (key_id, token))


async def take_over(services: "Services", key_id: str, token: str) -> bool:
    """Claim a request whose worker has gone silent (its node died); of several nodes trying, one wins."""
    return await touch(services, key_id, token, stale=True)


async def touch(services: "Services", key_id: str, token: str, stale: bool = False) -> bool:
    """Say the work is still going; with `stale`, only where nobody has said so for the takeover time."""
    same = row_of(key_id, token)
    if stale:
        same &= db.IdempotentRequest.heartbeat_at < db.now() - timedelta(seconds=services.settings.takeover_seconds)
    async with services.sessions() as session:
        result = await session.execute(
            update(db.IdempotentRequest)
            .where(same, db.IdempotentRequest.status == "running")
            .values(heartbeat_at=db.now())
        )
        await session.commit()
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def run(services: "Services", key_id: str, token: str, work: Callable[[], Awaitable[Response]]) -> Response:
    """Do the work as the key's owner. It goes on if the client leaves: its retry will want the answer."""
    response: Response | None = await asyncio.shield(detach(services, own(services, key_id, token, work)))
    assert response is not None  # this work always has an answer
    return response


async def run_stream(
    services: "Services",
    key_id: str,
    token: str,
    open_events: Callable[[], Awaitable[tuple[dict[str, str], AsyncIterator[bytes]]]],
    answer: Callable[[dict[str, str], AsyncIterator[bytes]], Response],
) -> Response:
    """A streamed answer as the key's owner: the events are made by work that goes on if the client
    leaves, sent to the client as they come, and kept, all together, as the answer to replay."""
    opened: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()
    sent = Relay()

    async def work() -> Response | None:
        try:
            headers, events = await open_events()
        except Exception as exc:  # refused before it started (limits): the client gets the error
            opened.set_exception(exc)
            return None
        opened.set_result(headers)
        kept = []
        try:
            async for event in events:
                sent.put(event)
                if event != KEEPALIVE_COMMENT:
                    kept.append(event)
        finally:
            sent.close()
        # With no image sent, nothing was charged: a retry may make them anew.
        if not any(COMPLETED in event for event in kept):
            return None
        return Response(b"".join(kept), media_type="text/event-stream", headers=headers)

    def ended(task: "asyncio.Task[Response | None]") -> None:
        if not opened.done():  # it failed before the stream could start (the database, say)
            failure = None if task.cancelled() else task.exception()
            opened.set_exception(failure or QubaxError("The streamed request stopped before it started."))

    detach(services, own(services, key_id, token, work)).add_done_callback(ended)
    return answer(await asyncio.shield(opened), sent.events())


class Relay:
    """Events handed from the work that makes them to the client that reads them, at its own pace."""

    def __init__(self) -> None:
        self.events_so_far: list[bytes] = []
        self.changed = asyncio.Event()
        self.closed = False

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


def detach(services: "Services", work: Awaitable[Any]) -> "asyncio.Task[Any]":
    """Run work that outlives its request, held where the event loop's weak references cannot lose it."""
    task = asyncio.ensure_future(work)
    services.detached.add(task)
    task.add_done_callback(services.detached.discard)
    return task


async def own(
    services: "Services", key_id: str, token: str, work: Callable[[], Awaitable[Response | None]]
) -> Response | None:
    """Store a success's answer, or a deterministic refusal's; let go of the key otherwise (a failure
    that may pass, or work that has nothing worth keeping). Upstream tasks the work starts are noted in
    the journal, where a takeover finds them."""
    claimed = await find(services, key_id, token)
    if claimed is not None:  # this runs in a task of its own (`detach`): the setting stays with the work
        ledger.charged_as.set(usage_id(claimed))
    beating = asyncio.create_task(heartbeat(services, key_id, token))
    owner = journal.request_owner(key_id, token)
    try:
        async with journal.kept(services.sessions, owner):
            response = await work()
    except BaseException as exc:
        if isinstance(exc, QubaxError) and exc.deterministic:
            await asyncio.shield(keep(services, key_id, token, refusal(exc)))
        else:
            await asyncio.shield(let_go(services, key_id, token))
        raise
    finally:
        beating.cancel()
    if response is None or response.status_code >= 300:
        await let_go(services, key_id, token)
        return response
    await keep(services, key_id, token, response)
    return response


def usage_id(row: db.IdempotentRequest) -> str:
    """The id of the request's usage record, in `db.new_id`'s form: the same for a node taking the
    request over, another for a request that claims the key afresh (after a failure, or a day)."""
    micros = (db.utc(row.created_at) - EPOCH) // timedelta(microseconds=1)
    digest = hashlib.sha256(f"{row.key_id}\0{row.idempotency_key}".encode()).hexdigest()
    return f"gen_{micros:013x}{digest[:10]}"


def refusal(error: QubaxError) -> Response:
    """The error's answer, as `app` renders it, to keep."""
    body = error.to_body().model_dump_json().encode()
    return Response(body, status_code=error.status_code, media_type="application/json", headers=error.headers)


async def keep(services: "Services", key_id: str, token: str, response: Response) -> None:
    """The answer stored for the key's lifetime, to replay; the work's journal is done with."""
    owner = journal.request_owner(key_id, token)
    headers = {name: value for name, value in response.headers.items() if name in REPLAYED_HEADERS}
    async with services.sessions() as session:
        await session.execute(
            update(db.IdempotentRequest)
            .where(row_of(key_id, token))
            .values(
                status="done",
                response_status=response.status_code,
                response_headers=json.dumps(headers),
                response_body=bytes(response.body),
            )
        )
        await session.commit()
    await journal.forget(services.sessions, owner)


async def heartbeat(services: "Services", key_id: str, token: str) -> None:
    while True:
        await asyncio.sleep(services.settings.takeover_seconds / 4)
        with contextlib.suppress(Exception):  # a missed beat only risks a takeover, never the work
            await touch(services, key_id, token)


async def let_go(services: "Services", key_id: str, token: str) -> None:
    await journal.forget(services.sessions, journal.request_owner(key_id, token))
    async with services.sessions() as session:
        await session.execute(
            delete(db.IdempotentRequest).where(
                row_of(key_id, token),
                db.IdempotentRequest.status == "running",
            )
        )
        await session.commit()


async def replay(row: db.IdempotentRequest, storage: Storage, public_url: str) -> Response:
    """The stored answer, its image links signed anew (the first ones may have expired)."""
    body = row.response_body or b""
    if b'"url"' in body:
        answer = orjson.loads(body)
        await relink(answer, storage, public_url)
        body = orjson.dumps(answer)
    headers = json.loads(row.response_headers or "{}") | {"x-qubax-idempotent-replayed": "true"}
    return Response(body, status_code=row.response_status or 200, headers=headers)


async def sweep(sessions: async_sessionmaker[AsyncSession]) -> int:
    """Forget the requests past their lifetime; returns how many."""
    async with sessions() as session:
        result = await session.execute(delete(db.IdempotentRequest).where(db.IdempotentRequest.expires_at < db.now()))
        await session.commit()
    return int(result.rowcount)  # type: ignore[attr-defined]
