"""The rows of `Idempotency-Key`s (`idempotency`): one per API key and idempotency key, shared by every
node, claimed before the work, kept with its answer, or let go."""

import hashlib
import json
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.sql.elements import ColumnElement

from qubax.records import journal, tables

Sessions = async_sessionmaker[AsyncSession]
LIFETIME = timedelta(hours=24)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


async def claim(sessions: Sessions, key_id: str, token: str, print_: str) -> tables.IdempotentRequest | None:
    """The key's row, if this request now owns the key (an expired claim is cleared first)."""
    now = tables.now()
    row = tables.IdempotentRequest(
        key_id=key_id,
        idempotency_key=token,
        fingerprint=print_,
        status="running",
        created_at=now,
        heartbeat_at=now,
        expires_at=now + LIFETIME,
    )
    async with sessions() as session:
        expired = row_of(key_id, token) & (tables.IdempotentRequest.expires_at < now)
        await session.execute(delete(tables.IdempotentRequest).where(expired))
        session.add(row)
        try:
            await session.commit()
        except IntegrityError:
            return None
    return row


def row_of(key_id: str, token: str) -> ColumnElement[bool]:
    """The one row of an API key's Idempotency-Key."""
    return (tables.IdempotentRequest.key_id == key_id) & (tables.IdempotentRequest.idempotency_key == token)


async def find(sessions: Sessions, key_id: str, token: str) -> tables.IdempotentRequest | None:
    async with sessions() as session:
        return await session.get(tables.IdempotentRequest, (key_id, token))


async def touch(sessions: Sessions, key_id: str, token: str, silent_for: float | None = None) -> bool:
    """Say the work is still going; with `silent_for`, only where nobody has said so for that many
    seconds (a takeover: of several nodes trying, one wins)."""
    same = row_of(key_id, token)
    if silent_for is not None:
        same &= tables.IdempotentRequest.heartbeat_at < tables.now() - timedelta(seconds=silent_for)
    async with sessions() as session:
        result = await session.execute(
            update(tables.IdempotentRequest)
            .where(same, tables.IdempotentRequest.status == "running")
            .values(heartbeat_at=tables.now())
        )
        await session.commit()
    return bool(result.rowcount)  # type: ignore[attr-defined]


def usage_id(row: tables.IdempotentRequest) -> str:
    """The id of the request's usage record, in `tables.new_id`'s form: the same for a node taking the
    request over, another for a request that claims the key afresh (after a failure, or a day)."""
    micros = (tables.utc(row.created_at) - EPOCH) // timedelta(microseconds=1)
    digest = hashlib.sha256(f"{row.key_id}\0{row.idempotency_key}".encode()).hexdigest()
    return f"gen_{micros:013x}{digest[:10]}"


async def keep(sessions: Sessions, key_id: str, token: str, status: int, headers: dict[str, str], body: bytes) -> None:
    """The answer stored for the key's lifetime, to replay; the work's journal is done with."""
    async with sessions() as session:
        await session.execute(
            update(tables.IdempotentRequest)
            .where(row_of(key_id, token))
            .values(status="done", response_status=status, response_headers=json.dumps(headers), response_body=body)
        )
        await session.commit()
    await journal.forget(sessions, journal.request_owner(key_id, token))


async def let_go(sessions: Sessions, key_id: str, token: str) -> None:
    await journal.forget(sessions, journal.request_owner(key_id, token))
    async with sessions() as session:
        await session.execute(
            delete(tables.IdempotentRequest).where(
                row_of(key_id, token),
                tables.IdempotentRequest.status == "running",
            )
        )
        await session.commit()


async def sweep(sessions: Sessions) -> int:
    """Forget the requests past their lifetime; returns how many."""
    async with sessions() as session:
        result = await session.execute(
            delete(tables.IdempotentRequest).where(tables.IdempotentRequest.expires_at < tables.now())
        )
        await session.commit()
    return int(result.rowcount)  # type: ignore[attr-defined]
