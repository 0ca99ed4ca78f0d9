"""The `qubax` command: run the server, manage keys, inspect models and usage, generate images."""

import asyncio
import contextlib
import logging
import logging.config
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import click
import orjson
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from qubax.background import webhook_targets
from qubax.background.jobs import STATUSES
from qubax.background.jobs import stop as stop_job
from qubax.errors import InvalidRequest, NotFound
from qubax.providers.registry import PROVIDERS, credentials, default_concurrency
from qubax.records import api_keys, db
from qubax.routing.catalog import Catalog
from qubax.routing.catalog_file import CatalogError, load_catalog
from qubax.server import logs
from qubax.server.client import generate
from qubax.server.services import open_storage
from qubax.server.settings import Settings

T = TypeVar("T")
logger = logging.getLogger("qubax")


@click.group()
@click.version_option(package_name="qubax")
def main() -> None:
    """Qubax Images: an OpenAI-compatible image generation gateway."""


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Server processes; more than one needs QUBAX_REDIS_URL, so that limits hold across them.",
)
def serve(host: str, port: int, workers: int) -> None:
    """Start the API server."""
    import uvicorn

    from qubax.app import create_app
    from qubax.server import startup
    from qubax.server.connection import GuardedConnection, connection_bound, raise_descriptor_limit

    try:
        settings = startup.read_settings()
        if workers > 1 and not settings.redis_url:
            raise click.UsageError(
                "--workers above 1 needs QUBAX_REDIS_URL: without Redis each process would count the limits "
                "(requests per minute, concurrency, upstream caps) on its own."
            )
        open_catalog(settings)  # a broken catalog file stops here, with its error, before anything starts
        asyncio.run(startup.check(settings))  # migrates the database too: once, before any worker starts
    except startup.StartupError as exc:
        raise click.ClickException(str(exc)) from None
    # One logging set-up for Qubax and uvicorn (each worker applies it too): with QUBAX_LOG_FORMAT=json
    # every line is JSON.
    log_config = logs.config(settings.log_format)
    logging.config.dictConfig(log_config)
    configured = [name for name in PROVIDERS if credentials(settings, name)]
    logger.info("data folder: %s", settings.data_dir)
    if configured:
        logger.info("upstreams configured: %s", ", ".join(configured))
    else:
        logger.warning("no upstream configured: live keys can use no model. %s", enabling(open_catalog(settings)))
    descriptors = raise_descriptor_limit()  # before the workers start: they inherit it
    connections = settings.max_connections or connection_bound(descriptors)
    logger.info("client connections: %d at once per process (file-descriptor limit %d)", connections, descriptors)
    # Qubax writes the access log itself (with the request id, never a query string): uvicorn's is off.
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "log_config": log_config,
        "access_log": False,
        "http": GuardedConnection,  # the connection limits (README "Running on the internet")
        # X-Forwarded-For/-Proto only from the proxies the operator names: uvicorn would take them from
        # 127.0.0.1, so any local process (or a same-host proxy passing them on) could choose its address.
        "proxy_headers": bool(settings.forwarded_allow_ips),
        "forwarded_allow_ips": settings.forwarded_allow_ips or "",
        # Room in the accept queue for a burst of what the guard would take (the kernel caps it at somaxconn).
        "backlog": max(2048, connections),
    }
    if workers == 1:
        uvicorn.run(create_app(settings), **options)
        return
    uvicorn.run("qubax.app:create_app", factory=True, workers=workers, **options)


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


@main.group()
def keys() -> None:
    """Create, list, update (limits) and revoke API keys."""


F = TypeVar("F", bound=Callable[..., Any])


def limit_options(command: F) -> F:
    """The per-key limit flags `keys create` and `keys update` share; 0 removes a limit."""
    for option in (
        click.option(
            "--monthly-budget-usd",
            type=click.FloatRange(0, db.MAX_BUDGET_USD),
            help="Spend cap per calendar month, USD.",
        ),
        click.option("--max-concurrent", type=click.IntRange(0, db.MAX_LIMIT), help="Requests in flight at once."),
        click.option("--images-per-day", type=click.IntRange(0, db.MAX_LIMIT), help="Images per UTC day."),
        click.option("--rpm", type=click.IntRange(0, db.MAX_LIMIT), help="Requests per minute."),
    ):
        command = option(command)
    return command


def chosen_limits(options: dict[str, Any]) -> dict[str, int | None]:
    """The limits given on the command line (an option left out is None), as stored."""
    return db.chosen_limits({name: value for name, value in options.items() if value is not None})


def describe_limits(key: db.ApiKey) -> str:
    parts = [f"{limit_name(name)} {limit_value(name, getattr(key, name))}" for name in db.LIMITS if getattr(key, name)]
    return ", ".join(parts) or "no limits"


def limit_name(name: str) -> str:
    return "monthly budget" if name == "monthly_budget_micros" else name.replace("_", " ")


def limit_value(name: str, value: int | None) -> str:
    if not value:
        return "none"
    return f"${db.to_usd(value):.2f}" if name == "monthly_budget_micros" else str(value)


@keys.command("create")
@click.option("--name", default="", help="A label to recognise the key by.")
@click.option("--test", is_flag=True, help="A test key: placeholder images, never an upstream call, never a cost.")
@limit_options
def create_key(name: str, test: bool, **options: Any) -> None:
    """Create a key and print it (alone on stdout). It is shown only this once."""
    limits = chosen_limits(options)
    stored, secret = with_session(lambda s: db.create_key(s, name=name, test=test, limits=limits))
    click.echo(f"Created {'test' if test else 'live'} key {stored.id} ({describe_limits(stored)}).", err=True)
    click.echo("Store it now: it is not shown again.", err=True)
    settings = Settings()
    if not test and not any(credentials(settings, name) for name in PROVIDERS):
        click.echo(
            f"Note: no upstream is configured, so this key can use no model yet. {enabling(open_catalog(settings))}",
            err=True,
        )
    click.echo(secret)


def enabling(catalog: Catalog) -> str:
    """Which variable enables which models: what to tell an operator who set none."""
    models: dict[str, list[str]] = {}
    for model in catalog.models:
        for route in model.routes:
            models.setdefault(PROVIDERS[route.provider].credential, []).append(model.id)
    listed = "; ".join(f"{variable} ({', '.join(dict.fromkeys(ids))})" for variable, ids in models.items())
    return f"Set one of: {listed}."


@keys.command("update")
@click.argument("key_or_id")
@limit_options
def update_key(key_or_id: str, **options: Any) -> None:
    """Change a key's limits (0 removes one); running servers apply it within a second or two."""

    chosen = chosen_limits(options)

    async def update(session: AsyncSession) -> tuple[db.ApiKey | None, dict[str, int | None]]:
        key = await find(session, key_or_id)
        if key is None:
            return None, {}
        before = {name: getattr(key, name) for name in chosen}
        return await db.update_limits(session, key, chosen), before

    key, before = with_session(update)
    if key is None:
        raise click.ClickException("No such key.")
    changes = [
        f"{limit_name(name)} {limit_value(name, old)} → {limit_value(name, getattr(key, name))}"
        for name, old in before.items()
        if (old or None) != (getattr(key, name) or None)
    ]
    click.echo(f"Updated {key.id}: {', '.join(changes)}." if changes else f"Nothing changed for {key.id}.")


async def find(session: AsyncSession, key_or_id: str) -> db.ApiKey | None:
    if api_keys.looks_like_key(key_or_id):
        return await db.find_key_by(session, digest=api_keys.digest_key(key_or_id))
    return await db.find_key_by(session, key_id=key_or_id)


@keys.command("webhook")
@click.argument("key_or_id")
@click.option("--url", default=None, help="Where the key's jobs report by default (https, public).")
@click.option("--no-url", is_flag=True, help="No default target: only jobs that name one report.")
@click.option("--rotate-secret", is_flag=True, help="Make a new signing secret; the old one stops working.")
def key_webhook(key_or_id: str, url: str | None, no_url: bool, rotate_secret: bool) -> None:
    """Set a key's webhooks. Its signing secret is made with its first target (or --rotate-secret) and
    shown once: give it to the key's owner, whose receiver checks our signatures with it."""
    settings = Settings()

    async def configure(session: AsyncSession) -> tuple[db.ApiKey | None, str | None]:
        if url is not None:
            await webhook_targets.check_target(url, settings.webhook_allowed_hosts)
        key = await find(session, key_or_id)
        if key is None:
            return None, None
        secret = webhook_targets.configure(key, None if no_url else url or key.webhook_url, rotate_secret)
        await session.commit()
        return key, secret

    try:
        key, secret = with_session(configure)
    except InvalidRequest as exc:
        raise click.ClickException(exc.message) from exc
    if key is None:
        raise click.ClickException("No such key.")
    click.echo(f"{key.id}: webhooks to {key.webhook_url or '(only the targets jobs name)'}.")
    if secret is not None:
        click.echo("Signing secret (shown once):")
        click.echo(secret)


@keys.command("list")
def list_keys() -> None:
    """List keys (prefix only; full keys are never stored)."""
    rows = [
        (
            k.id,
            k.prefix + "…",
            "test" if k.test else "live",
            k.name,
            f"{k.created_at:%Y-%m-%d %H:%M}",
            "revoked" if k.revoked_at else "active",
        )
        for k in with_session(db.list_keys)
    ]
    print_table(("ID", "KEY", "KIND", "NAME", "CREATED", "STATUS"), rows)


@keys.command("revoke")
@click.argument("key_or_id")
def revoke_key(key_or_id: str) -> None:
    """Revoke a key, given the full key or its id."""

    async def revoke(session: AsyncSession) -> tuple[db.ApiKey | None, datetime | None]:
        key = await find(session, key_or_id)
        if key is None or key.revoked_at is not None:
            return key, None if key is None else key.revoked_at
        return await db.revoke_key(session, key_id=key.id), None

    key, earlier = with_session(revoke)
    if key is None:
        raise click.ClickException("No such key.")
    if earlier is not None:
        click.echo(f"{key.id} ({key.prefix}…) was already revoked, on {earlier:%Y-%m-%d %H:%M} UTC.")
    else:
        click.echo(f"Revoked {key.id} ({key.prefix}…).")


@main.command()
def models() -> None:
    """List the catalog: each model's default size, images per request, price per image, aliases and
    routes in failover order (* marks the routes whose credential is set)."""
    settings = Settings()
    catalog = open_catalog(settings)
    configured = {name for name in PROVIDERS if credentials(settings, name)}
    rows = []
    for model in catalog.models:
        routes = ", ".join(route.provider + ("*" if route.provider in configured else "") for route in model.routes)
        prices = sorted({p.usd for p in model.prices})
        price = f"${prices[0]}" if len(prices) == 1 else f"from ${prices[0]}"  # by quality or size
        n_range = "1" if model.max_n == 1 else f"1-{model.max_n}"
        name = model.id + (f" ({', '.join(model.aliases)})" if model.aliases else "")
        rows.append((name, model.default_size, n_range, price, routes))
    print_table(("MODEL (ALIASES)", "DEFAULT SIZE", "N", "PER IMAGE", "ROUTES (* CONFIGURED)"), rows)
    missing = [f"{info.credential} ({name})" for name, info in PROVIDERS.items() if name not in configured]
    if missing:
        click.echo(f"\nTo enable a route, set its credential: {', '.join(missing)}.")


def open_catalog(settings: Settings) -> Catalog:
    try:
        return load_catalog(settings.catalog, set(PROVIDERS), default_concurrency())
    except CatalogError as exc:
        raise click.ClickException(str(exc)) from exc


@main.command()
def usage() -> None:
    """Images delivered and their cost, per key and model."""
    rows = [
        (r.key_id, r.key_name, r.model, str(r.requests), str(r.images), f"${db.to_usd(r.cost_micros):.4f}")
        for r in with_session(db.usage)
    ]
    print_table(("KEY", "NAME", "MODEL", "REQUESTS", "IMAGES", "COST"), rows)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=False)]
    for row in (headers, *rows):
        click.echo("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


@main.group()
def jobs() -> None:
    """Async jobs of every key (`Prefer: respond-async`): list, show, cancel."""


@jobs.command("list")
@click.option("--key", "key_or_id", default=None, help="Only this key's jobs: the key or its id.")
@click.option("--status", type=click.Choice(STATUSES), default=None)
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 10_000))
def list_jobs(key_or_id: str | None, status: str | None, limit: int) -> None:
    """The newest jobs first."""

    async def load(session: AsyncSession) -> list[db.ImageJob]:
        query = select(db.ImageJob).order_by(db.ImageJob.id.desc()).limit(limit)
        if key_or_id is not None:
            key = await find(session, key_or_id)
            query = query.where(db.ImageJob.key_id == (key.id if key else None))
        if status is not None:
            query = query.where(db.ImageJob.status == status)
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

    async def load(session: AsyncSession) -> db.ImageJob | None:
        return await session.get(db.ImageJob, job_id)

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

    async def stop() -> db.ImageJob:
        settings = Settings()
        async with open_engine(settings) as engine, open_storage(settings) as storage:
            return await stop_job(db.sessions(engine), job_id, storage)

    try:
        job = asyncio.run(stop())
    except NotFound as exc:
        raise click.ClickException(f"No job {job_id}.") from exc
    click.echo(f"{job.id}: {job.status}.")


def ended_at(job: db.ImageJob) -> str:
    return "" if job.completed_at is None else f"{job.completed_at:%Y-%m-%d %H:%M:%S}"


main.add_command(generate)
