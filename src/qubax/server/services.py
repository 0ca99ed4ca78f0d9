"""The long-lived objects: built once per app by `open_services` (the app's lifespan), closed with it,
and handed to routes through the `ServicesDep` dependency."""

import asyncio
import contextlib
import gc
import logging
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from qubax.errors import DatabaseUnavailable, QubaxError
from qubax.limits.quota import Quotas, limiter_storage
from qubax.limits.slots import open_slots
from qubax.pipeline import claims
from qubax.pipeline.converter import Converter
from qubax.pipeline.uploads import Decoding
from qubax.providers import Provider
from qubax.providers.callbacks import Callbacks, open_callbacks, reachable
from qubax.providers.registry import build_providers
from qubax.providers.transport import Http, Timeouts, open_session
from qubax.records import db, journal, queries, tables
from qubax.records.api_keys import KeyCache
from qubax.records.ledger import Ledger
from qubax.records.storage import LocalStorage, Storage, signing_secret
from qubax.routing.breaker import Breakers
from qubax.routing.catalog import Catalog
from qubax.routing.lifecycle import Published
from qubax.server.masking import Mask, configured_secrets
from qubax.server.metrics import Metrics
from qubax.server.settings import Settings

logger = logging.getLogger("qubax")
GC_THRESHOLD = 20_000  # allocations between young-generation collections; the default is 700
# Young collections between middle-generation ones; the default is 10. A request in flight for seconds
# (a slow upstream) keeps its objects alive through the young collections, and each middle one went
# over them all again, though they are freed when the request ends: with 4,000 in flight the collector
# took 26-27% of the CPU, and 16-17% with this (bench/README.md).
GC_MIDDLE_THRESHOLD = 100


@dataclass
class Services:
    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    http: Http
    storage: Storage
    catalog: Catalog
    providers: dict[str, Provider]
    breakers: Breakers
    ledger: Ledger
    quotas: Quotas
    metrics: Metrics
    mask: Mask  # for foreign text (an upstream's words) before it is logged or stored
    decoding: Decoding  # the work one upload may cause, and how many are decoded at once
    converter: Converter  # upstream images made into the format and size asked, in worker processes
    callbacks: Callbacks | None  # upstream tasks' callbacks to us (None without QUBAX_PUBLIC_URL)
    keys: KeyCache[tables.KeyRecord] = field(default_factory=KeyCache)
    # Work that outlives its request (an idempotent request whose client left): held here, as the event
    # loop keeps only weak references to tasks.
    detached: set["asyncio.Task[Any]"] = field(default_factory=set)
    job_posted: asyncio.Event = field(default_factory=asyncio.Event)  # wakes this node's job runner
    webhook_posted: asyncio.Event = field(default_factory=asyncio.Event)  # wakes its webhook deliverer
    published: Published = field(default_factory=Published)  # shutdown dates upstreams publish


@contextlib.asynccontextmanager
async def open_services(settings: Settings, catalog: Catalog, metrics: Metrics) -> AsyncIterator[Services]:
    async with contextlib.AsyncExitStack() as held:  # closed in reverse: the ledger before the engine
        engine = db.connect(settings.resolved_database_url)
        held.push_async_callback(engine.dispose)
        await db.migrate(engine)
        storage = await held.enter_async_context(open_storage(settings))
        timeouts = Timeouts(
            settings.upstream_connect_timeout_seconds,
            settings.upstream_read_timeout_seconds,
            settings.upstream_submit_timeout_seconds,
        )
        # No cap of the pool's own unless the operator sets one: the providers' caps (slots) bound the calls.
        connections = settings.upstream_connections or 0
        http = await held.enter_async_context(open_session(timeouts, connections, metrics.count_wait))
        # A slot outlives no request: its hold lapses after the longest one could take.
        slots = await held.enter_async_context(open_slots(settings.redis_url, settings.request_timeout_seconds + 60))
        callbacks = await held.enter_async_context(
            open_callbacks(
                reachable(settings.public_url, settings.upstream_callbacks),
                signing_secret(settings),
                settings.callback_poll_seconds,
                settings.redis_url,
            )
        )
        providers = build_providers(settings, http, dict(catalog.concurrency), slots, callbacks)
        breakers = Breakers(settings.breaker_failures, settings.breaker_cooldown_seconds)
        sessions = db.sessions(engine)
        ledger = Ledger(engine)
        held.push_async_callback(ledger.close)
        quotas = Quotas(sessions, slots, limiter_storage(settings.redis_url))
        sweeper = asyncio.create_task(sweep_forever(storage, sessions, settings))
        held.push_async_callback(stop, sweeper)
        converter = Converter(settings.convert_processes)
        held.push_async_callback(asyncio.to_thread, converter.close)
        settle_garbage_collector()
        yield Services(
            settings=settings,
            engine=engine,
            sessions=sessions,
            http=http,
            storage=storage,
            catalog=catalog,
            providers=providers,
            breakers=breakers,
            ledger=ledger,
            quotas=quotas,
            metrics=metrics,
            mask=Mask(configured_secrets(settings)),
            decoding=Decoding(settings.max_decode_bytes, asyncio.Semaphore(settings.decode_concurrency)),
            converter=converter,
            callbacks=callbacks,
        )


async def get_services(request: Request) -> Services:  # async: FastAPI runs plain defs in a thread
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


@contextlib.asynccontextmanager
async def open_storage(settings: Settings) -> AsyncIterator[Storage]:
    """Where `QUBAX_STORAGE_URL` says images live: `s3://bucket/prefix` (one client for the app's life),
    `file:///path`, or by default the data folder."""
    secret, ttl = signing_secret(settings), settings.image_ttl_seconds
    url = urllib.parse.urlsplit(settings.storage_url or "")
    if url.scheme == "s3" and url.netloc:
        from qubax.records import s3  # the `s3` extra: only when asked for

        async with s3.connect() as client:
            yield s3.S3Storage(client, url.netloc, url.path, secret, ttl, own_links=bool(settings.public_url))
    elif url.scheme in ("", "file") and url.netloc in ("", "localhost"):
        local = LocalStorage(Path(urllib.parse.unquote(url.path)) if url.path else settings.images_dir, secret, ttl)
        try:
            yield local
        finally:
            await local.close()
    else:
        raise ValueError("QUBAX_STORAGE_URL must be s3://bucket/prefix or file:///absolute/path.")


async def sweep_forever(storage: Storage, sessions: async_sessionmaker[AsyncSession], settings: Settings) -> None:
    while True:
        await sweep(storage, sessions, settings)
        await asyncio.sleep(settings.sweep_interval_seconds)


async def sweep(storage: Storage, sessions: async_sessionmaker[AsyncSession], settings: Settings) -> None:
    """Remove expired images, and forget expired idempotency keys, abandoned upstream tasks and old jobs
    with their images; every `QUBAX_SWEEP_INTERVAL_SECONDS`."""
    ended_before = tables.now() - timedelta(days=settings.job_retention_days)
    try:
        async with sessions() as session:
            old_jobs = set(await session.scalars(queries.ended_jobs(ended_before)))
        removed = await storage.sweep(old_jobs)
        if removed:
            logger.info("swept %d expired images", removed)
    except (OSError, SQLAlchemyError, QubaxError) as exc:  # the next round may do better
        logger.warning("sweeping expired images failed: %s", exc)
        old_jobs = None
    try:
        await claims.sweep(sessions)
        await journal.sweep(sessions)
        if old_jobs is not None:  # a job goes after its images, or they would be kept for good
            async with sessions() as session:
                await queries.forget_jobs(session, ended_before)
    except (OSError, SQLAlchemyError, DatabaseUnavailable) as exc:
        logger.warning("forgetting expired idempotency keys and jobs failed: %s", exc)


async def stop(task: "asyncio.Task[None]") -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def settle_garbage_collector() -> None:
    """Move everything built at start (modules, the catalog, SQLAlchemy's mappers) out of the collector's
    sight, and let it run less often: with so many long-lived objects, full collections triggered
    by per-request garbage were a large share of the CPU (bench/README.md)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, GC_MIDDLE_THRESHOLD, gc.get_threshold()[2])
