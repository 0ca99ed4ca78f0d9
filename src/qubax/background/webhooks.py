"""Webhooks: when a job ends, its target is told, signed as the Standard Webhooks specification says
(`webhook-id`, `webhook-timestamp`, `webhook-signature`, with the key's `whsec_…` secret).

A delivery is a row, written in the transaction that ends the job (`jobs.close`), and sent by
whichever node's deliverer takes it first; a target that does not answer 2xx in time is tried again
after each pause of `QUBAX_WEBHOOK_RETRY_SECONDS` (at least once: receivers drop repeats by
`webhook-id`). Each try carries the job as it is then, its image links signed anew. Where a target
may be is for `targets` to say.
"""

import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
from sqlalchemy import Update, select, update
from standardwebhooks import Webhook

from qubax.background import jobs, loops
from qubax.background.webhook_targets import PublicResolver, check_literal
from qubax.records import tables
from qubax.server import traces
from qubax.server.services import Services

logger = logging.getLogger("qubax")
CONCURRENCY = 8  # deliveries each node sends at once
ERROR_CHARS = 500


async def deliver_forever(services: Services) -> None:
    """This node's deliverer: takes due deliveries, a few at a time, for as long as the app runs."""
    async with open_client(services) as http:
        await loops.take_and_run(
            lambda room: take(services, room),
            lambda delivery: attempt(services, http, delivery),
            services.webhook_posted,
            CONCURRENCY,
            services.settings.job_poll_seconds,
        )


@contextlib.asynccontextmanager
async def open_client(services: Services) -> AsyncIterator[aiohttp.ClientSession]:
    """A session of its own: no proxies from the environment, and the public-only resolver."""
    connector = aiohttp.TCPConnector(resolver=PublicResolver(services.settings.webhook_allowed_hosts), limit=64)
    timeout = aiohttp.ClientTimeout(total=services.settings.webhook_timeout_seconds)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False) as http:
        yield http


async def take(services: Services, room: int) -> list[tables.WebhookDelivery]:
    """The most overdue deliveries, up to `room`, now this node's for the length of one try."""
    now = tables.now()
    due = (tables.WebhookDelivery.status == "pending") & (tables.WebhookDelivery.next_attempt_at <= now)
    candidates = select(tables.WebhookDelivery).where(due).order_by(tables.WebhookDelivery.next_attempt_at)
    lease = now + timedelta(seconds=services.settings.webhook_timeout_seconds + 30)

    def take_them(deliveries: list[tables.WebhookDelivery]) -> Update:
        return (
            update(tables.WebhookDelivery)
            .where(tables.WebhookDelivery.id.in_([delivery.id for delivery in deliveries]), due)
            .values(next_attempt_at=lease)
            .returning(tables.WebhookDelivery.id)
        )

    return await loops.claim(services.sessions, candidates, take_them, room, lambda delivery: delivery.id)


async def attempt(services: Services, http: aiohttp.ClientSession, delivery: tables.WebhookDelivery) -> None:
    """One try of one delivery, and what came of it: a trace of its own, without the target's URL
    (its query may hold the receiver's token)."""
    with traces.span("qubax.webhook") as span:
        outcome, status = await deliver(services, http, delivery)
        if span is not None:
            span.set_attributes({"qubax.delivery_id": delivery.id, "qubax.job_id": delivery.job_id})
            span.set_attributes({"qubax.try": delivery.attempts + 1, "qubax.outcome": outcome})
            if status is not None:
                span.set_attribute("http.response.status_code", status)


async def deliver(
    services: Services, http: aiohttp.ClientSession, delivery: tables.WebhookDelivery
) -> tuple[str, int | None]:
    """The try itself: how the delivery stands after it, and the target's status, if it answered."""
    status, error = None, None
    try:
        status = await send(services, http, delivery)
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
        error = f"{type(exc).__name__}: {exc}"[:ERROR_CHARS] or type(exc).__name__
    if status is not None and not 200 <= status < 300:
        error = f"The target answered {status}."
    tries = delivery.attempts + 1
    pauses = services.settings.webhook_retry_seconds
    outcome = "delivered" if error is None else ("pending" if tries <= len(pauses) else "failed")
    pause = pauses[min(tries, len(pauses)) - 1]
    async with services.sessions() as session:
        await session.execute(
            update(tables.WebhookDelivery)
            .where(tables.WebhookDelivery.id == delivery.id)
            .values(
                status=outcome,
                attempts=tries,
                last_status=status,
                last_error=error,
                next_attempt_at=tables.now() + timedelta(seconds=pause),
                delivered_at=tables.now() if error is None else None,
            )
        )
        await session.commit()
    services.metrics.webhook_tries.inc(("retry" if outcome == "pending" else outcome,))
    logger.info("webhook %s for job %s: try %d, %s", delivery.id, delivery.job_id, tries, error or "delivered")
    return outcome, status


async def send(services: Services, http: aiohttp.ClientSession, delivery: tables.WebhookDelivery) -> int:
    """POST the job's end to its target; returns the target's HTTP status."""
    check_literal(urlsplit(delivery.url).hostname or "", services.settings.webhook_allowed_hosts)
    async with services.sessions() as session:
        job = await session.get(tables.ImageJob, delivery.job_id)
        key = await session.get(tables.ApiKey, delivery.key_id)
    if job is None or key is None or not key.webhook_secret:
        raise ValueError("the job, its key or the key's webhook secret is gone")
    described = jobs.shown(await jobs.describe(services, job, job.public_url))
    sent_at = datetime.now(UTC)
    body = orjson.dumps({"type": f"image.job.{job.status}", "timestamp": sent_at.isoformat(), "data": described})
    headers = signed_headers(key.webhook_secret, delivery.id, sent_at, body)
    async with http.post(delivery.url, data=body, headers=headers, allow_redirects=False) as response:
        return response.status


def signed_headers(secret: str, message_id: str, sent_at: datetime, body: bytes) -> dict[str, Any]:
    signature = Webhook(secret).sign(message_id, sent_at, body.decode())
    return {
        "content-type": "application/json",
        "user-agent": "qubax-webhooks",
        "webhook-id": message_id,
        "webhook-timestamp": str(int(sent_at.timestamp())),
        "webhook-signature": signature,
    }
