"""The record step: one request's usage record (its generation and every attempt), around its work and
written to the ledger when the work ends, whichever way."""

import asyncio
import time
from typing import Any

from qubax.errors import QubaxError, UpstreamTimeout
from qubax.pipeline.failover import count_timeout
from qubax.records import tables
from qubax.records.ledger import GenerationRecord
from qubax.routing.request import ImageRequest
from qubax.server.services import Services


class recording:  # lower case: used like a function, `async with recording(...) as generation:`
    """The usage record of one request's work, which runs inside, within the request's deadline: it is
    written when the work ends, whichever way (the client leaving too), before the exit returns. A
    class rather than `contextlib.asynccontextmanager`, whose generator costs measurably more on the
    hot path (bench/README.md)."""

    def __init__(
        self, request: ImageRequest, key: tables.KeyRecord, services: Services, charge_id: str | None = None
    ) -> None:
        self.services, self.charge_id = services, charge_id
        self.generation = GenerationRecord(tables.new_id("gen"), key.id, request.model.id, request.n, request.size)
        self.deadline = asyncio.timeout(services.settings.request_timeout_seconds)
        self.started = 0.0

    async def __aenter__(self) -> GenerationRecord:
        self.started = time.monotonic()
        await self.deadline.__aenter__()
        return self.generation

    async def __aexit__(self, kind: object, error: BaseException | None, traceback: Any) -> None:
        try:
            await self.deadline.__aexit__(type(error) if error else None, error, traceback)
        except TimeoutError as exc:  # the deadline passed (the work was cancelled for it)
            error = exc
        if isinstance(error, TimeoutError):
            timeout = UpstreamTimeout("The upstream did not finish within the request deadline.")
            count_timeout(self.services, self.generation.attempts)
            await finish(self.services, self.generation, self.started, timeout, self.charge_id)
            raise timeout from error
        # CancelledError too: the client went away, and that is recorded. The error itself propagates.
        await finish(self.services, self.generation, self.started, error, self.charge_id)


async def finish(
    services: Services,
    generation: GenerationRecord,
    started: float,
    error: BaseException | None,
    charge_id: str | None = None,
) -> None:
    """Record the generation and every attempt. Only delivered images of live keys cost anything: a
    failed request has none, unless a streamed answer had sent some before it failed.

    Work with an identity of its own (a job, an idempotent request) is charged as `charge_id`: a node
    that takes such work over from one that died after recording it records the same id, and a record
    whose id is taken is not written (`ON CONFLICT DO NOTHING`), so the work is charged once."""
    generation.latency_ms = int((time.monotonic() - started) * 1000)
    if error is not None:
        # Our own words for our errors; anything else (a crash) may quote foreign text.
        text = error.message if isinstance(error, QubaxError) else services.mask(str(error))
        generation.error = text[:1000] or type(error).__name__
        if isinstance(error, QubaxError):
            generation.outcome = error.code or "error"
        else:
            generation.outcome = "client_disconnected" if isinstance(error, asyncio.CancelledError) else "server_error"
    else:
        generation.outcome = "ok"
    if generation.images and charge_id is not None:
        # Only a record that charges: a failed try must not keep a takeover's success unrecorded.
        generation.id = charge_id
    try:
        await services.ledger.record(generation)
    except QubaxError as exc:  # not recorded, so not charged: the client hears the failure, not the images
        generation.outcome, generation.images, generation.cost_micros = exc.code or "error", 0, 0
        raise
    finally:  # counted even when the write failed or the client left: the record says what happened
        services.metrics.observe(generation)
