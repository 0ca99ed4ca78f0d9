"""The operator's commands besides `qubax keys` and `qubax serve`: `models` (the catalog and which of its
routes have a credential), `usage` and `jobs`; and what every command that reads the database or the
catalog shares (a session, a key found by its secret or id, the catalog file opened, a table printed).
Those live here, not in cli, because cli imports every command module: key_commands takes them from here."""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

import click
import orjson
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from qubax.background.jobs import STATUSES
from qubax.background.jobs import stop as stop_job
from qubax.errors import NotFound
from qubax.providers.registry import PROVIDERS, credentials, default_concurrency
from qubax.records import api_keys, db, queries, tables
from qubax.routing.catalog import Catalog
from qubax.routing.catalog_file import CatalogError, load_catalog
from qubax.routing.models import Route
from qubax.server.client import served_models
from qubax.server.services import open_storage
from qubax.server.settings import Settings

T = TypeVar("T")


@contextlib.asynccontextmanager
async def open_engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    """The database, brought to the newest schema, for the life of the block."""
    engine = db.connect(settings.resolved_database_url)
    try:
        await db.migrate(engine)
        yield engine
    finally:
        await engine.dispose()


@contextlib.asynccontextmanager
async def open_session(settings: Settings) -> AsyncIterator[AsyncSession]:
    async with open_engine(settings) as engine, db.sessions(engine)() as session:
        yield session


def with_session(work: Callable[[AsyncSession], Awaitable[T]]) -> T:
    async def run() -> T:
        async with open_session(Settings()) as session:
            return await work(session)

    return asyncio.run(run())


async def find(session: AsyncSession, key_or_id: str) -> tables.ApiKey | None:
    if api_keys.looks_like_key(key_or_id):
        return await queries.find_key_by(session, digest=api_keys.digest_key(key_or_id))
    return await queries.find_key_by(session, key_id=key_or_id)


def open_catalog(settings: Settings) -> Catalog:
    try:
        return load_catalog(settings.catalog, set(PROVIDERS), default_concurrency())
    except CatalogError as exc:
        raise click.ClickException(str(exc)) from exc


def enabling(catalog: Catalog) -> str:
    """Which variable enables which models: what to tell an operator who set none."""
    models: dict[str, list[str]] = {}
    for model in catalog.models:
        for route in model.routes:
            models.setdefault(PROVIDERS[route.provider].credential, []).append(model.id)
    listed = "; ".join(f"{variable} ({', '.join(dict.fromkeys(ids))})" for variable, ids in models.items())
    return f"Set one of: {listed}."


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=False)]
    for row in (headers, *rows):
        click.echo("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


@click.command()
@click.option("--base-url", default="http://127.0.0.1:8000/v1", show_default=True, help="The server to ask.")
@click.option("--api-key", envvar="QUBAX_API_KEY", help="Or set QUBAX_API_KEY: the key to ask the server with.")
def models(base_url: str, api_key: str | None) -> None:
    """List the catalog: each model's default size, images per request, price per image, routes in
    failover order (a stand-in, tried when the upstream no longer serves the model, says so); then
    aliases, and the day the upstream shuts down each model that has one (`shutdown_date`) with the model
    to ask for instead. With a key, the running server says which models it serves that key; without
    one, or with no server there, * marks the routes whose credential is set in this shell."""
    settings = Settings()
    catalog = open_catalog(settings)
    served = served_models(base_url, api_key) if api_key else None
    if served is None:  # the server's own environment may differ: say whose this is
        why = "no QUBAX_API_KEY to ask a server with" if not api_key else f"no server answered at {base_url}"
        click.echo(f"({why}: this shows this shell's settings, which may not be the server's.)", err=True)
    else:
        click.echo(f"(Asked the server at {base_url}: it serves {len(served)} names to this key.)", err=True)
    configured = {name for name in PROVIDERS if credentials(settings, name)} if served is None else set()
    rows = []
    for model in catalog.models:
        routes = ", ".join(route_name(route, configured) for route in model.routes)
        prices = sorted({p.usd for p in model.prices})
        price = f"${prices[0]}" if len(prices) == 1 else f"from ${prices[0]}"  # by quality or size
        if (megapixel := model.megapixel_price) is not None:  # the first megapixel, then each further one
            price = f"${megapixel.first}+{megapixel.further}/MP"
        n_range = "1" if model.max_n == 1 else f"1-{model.max_n}"
        rows.append((model.id, model.default_size, n_range, price, routes))
    if served is None:
        print_table(("MODEL", "DEFAULT SIZE", "N", "PER IMAGE", "ROUTES (* CONFIGURED)"), rows)
    else:
        marked = [(row[0], "yes" if row[0] in served else "no", *row[1:]) for row in rows]
        print_table(("MODEL", "SERVED", "DEFAULT SIZE", "N", "PER IMAGE", "ROUTES"), marked)
    # Below the table, which they would widen past a terminal (Gemini's models have several each).
    aliased = [f"  {model.id}: {', '.join(model.aliases)}" for model in catalog.models if model.aliases]
    if aliased:
        click.echo("\nAliases:\n" + "\n".join(aliased))
    ending = [
        f"  {model.id}: {model.shutdown_date}" + (f" (successor: {model.successor})" if model.successor else "")
        for model in catalog.models
        if model.shutdown_date is not None
    ]
    if ending:
        click.echo("\nShutdown dates:\n" + "\n".join(ending))
    missing = [f"{info.credential} ({name})" for name, info in PROVIDERS.items() if name not in configured]
    if missing and served is None:
        click.echo(f"\nTo enable a route, set its credential: {', '.join(missing)}.")


def route_name(route: Route, configured: set[str]) -> str:
    """`bfl*`; a stand-in by the model it makes: `openai:gpt-image-2 (stand-in)`."""
    name = route.provider + ("*" if route.provider in configured else "")
    return f"{name}:{route.upstream_model} (stand-in)" if route.only_after else name


@click.command()
def usage() -> None:
    """Images delivered and their cost, per key and model."""
    rows = [
        (r.key_id, r.key_name, r.model, str(r.requests), str(r.images), f"${queries.to_usd(r.cost_micros):.4f}")
        for r in with_session(queries.usage)
    ]
    print_table(("KEY", "NAME", "MODEL", "REQUESTS", "IMAGES", "COST"), rows)


@click.group()
def jobs() -> None:
    """Async jobs of every key (`Prefer: respond-async`): list, show, cancel."""


@jobs.command("list")
@click.option("--key", "key_or_id", default=None, help="Only this key's jobs: the key or its id.")
@click.option("--status", type=click.Choice(STATUSES), default=None)
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 10_000))
def list_jobs(key_or_id: str | None, status: str | None, limit: int) -> None:
    """The newest jobs first."""

    async def load(session: AsyncSession) -> list[tables.ImageJob]:
        query = select(tables.ImageJob).order_by(tables.ImageJob.id.desc()).limit(limit)
        if key_or_id is not None:
            key = await find(session, key_or_id)
            query = query.where(tables.ImageJob.key_id == (key.id if key else None))
        if status is not None:
            query = query.where(tables.ImageJob.status == status)
        return list(await session.scalars(query))

    rows = [
        (job.id, job.key_id, job.model, job.status, f"{job.created_at:%Y-%m-%d %H:%M:%S}", ended_at(job))
        for job in with_session(load)
    ]
    print_table(("ID", "KEY", "MODEL", "STATUS", "CREATED", "ENDED"), rows)


@jobs.command("show")
@click.argument("job_id")
def show_job(job_id: str) -> None:
    """One job: its key, model, status, times, request fields, and its images or its error."""

    async def load(session: AsyncSession) -> tables.ImageJob | None:
        return await session.get(tables.ImageJob, job_id)

    job = with_session(load)
    if job is None:
        raise click.ClickException(f"No job {job_id}.")
    images = len(orjson.loads(job.result)["data"]) if job.result else None
    error = orjson.loads(job.error)["message"] if job.error else None
    for name, value in [
        ("id", job.id), ("key", job.key_id), ("endpoint", job.endpoint), ("model", job.model), ("status", job.status),
        ("created", f"{job.created_at:%Y-%m-%d %H:%M:%S}"), ("ended", ended_at(job)), ("request", job.fields),
        ("images", images), ("error", error),
    ]:  # fmt: skip
        if value is not None:
            click.echo(f"{name + ':':10}{value}")


@jobs.command("cancel")
@click.argument("job_id")
def cancel_job(job_id: str) -> None:
    """Cancel a job: a queued one at once, a running one (and its upstream work) by its node's runner."""

    async def stop() -> tables.ImageJob:
        settings = Settings()
        async with open_engine(settings) as engine, open_storage(settings) as storage:
            return await stop_job(db.sessions(engine), job_id, storage)

    try:
        job = asyncio.run(stop())
    except NotFound as exc:
        raise click.ClickException(f"No job {job_id}.") from exc
    click.echo(f"{job.id}: {job.status}.")


def ended_at(job: tables.ImageJob) -> str:
    return "" if job.completed_at is None else f"{job.completed_at:%Y-%m-%d %H:%M:%S}"
