"""`qubax keys`: create, update, list and revoke API keys and set their webhooks, with the limit flags
`create` and `update` share and how a key's limits read on the terminal."""

from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

import click
from sqlalchemy.ext.asyncio import AsyncSession

from qubax.background import webhook_targets
from qubax.errors import InvalidRequest
from qubax.providers.registry import PROVIDERS, credentials
from qubax.records import queries, tables
from qubax.server.operator_commands import enabling, find, open_catalog, print_table, with_session
from qubax.server.settings import Settings


@click.group()
def keys() -> None:
    """Create, list, update (limits) and revoke API keys."""


F = TypeVar("F", bound=Callable[..., Any])


def limit_options(command: F) -> F:
    """The per-key limit flags `keys create` and `keys update` share; 0 removes a limit."""
    for option in (
        click.option(
            "--monthly-budget-usd",
            type=click.FloatRange(0, queries.MAX_BUDGET_USD),
            help="Spend cap per calendar month, USD.",
        ),
        click.option("--max-concurrent", type=click.IntRange(0, queries.MAX_LIMIT), help="Requests in flight at once."),
        click.option("--images-per-day", type=click.IntRange(0, queries.MAX_LIMIT), help="Images per UTC day."),
        click.option("--rpm", type=click.IntRange(0, queries.MAX_LIMIT), help="Requests per minute."),
    ):
        command = option(command)
    return command


def chosen_limits(options: dict[str, Any]) -> dict[str, int | None]:
    """The limits given on the command line (an option left out is None), as stored."""
    return queries.chosen_limits({name: value for name, value in options.items() if value is not None})


def describe_limits(key: tables.ApiKey) -> str:
    parts = [
        f"{limit_name(name)} {limit_value(name, getattr(key, name))}" for name in queries.LIMITS if getattr(key, name)
    ]
    return ", ".join(parts) or "no limits"


def limit_name(name: str) -> str:
    return "monthly budget" if name == "monthly_budget_micros" else name.replace("_", " ")


def limit_value(name: str, value: int | None) -> str:
    if not value:
        return "none"
    return f"${queries.to_usd(value):.2f}" if name == "monthly_budget_micros" else str(value)


@keys.command("create")
@click.option("--name", default="", help="A label to recognise the key by.")
@click.option("--test", is_flag=True, help="A test key: placeholder images, never an upstream call, never a cost.")
@limit_options
def create_key(name: str, test: bool, **options: Any) -> None:
    """Create a key and print it (alone on stdout). It is shown only this once."""
    limits = chosen_limits(options)
    stored, secret = with_session(lambda s: queries.create_key(s, name=name, test=test, limits=limits))
    click.echo(f"Created {'test' if test else 'live'} key {stored.id} ({describe_limits(stored)}).", err=True)
    click.echo("Store it now: it is not shown again.", err=True)
    settings = Settings()
    if not test and not any(credentials(settings, name) for name in PROVIDERS):
        click.echo(
            f"Note: no upstream is configured, so this key can use no model yet. {enabling(open_catalog(settings))}",
            err=True,
        )
    click.echo(secret)


@keys.command("update")
@click.argument("key_or_id")
@limit_options
def update_key(key_or_id: str, **options: Any) -> None:
    """Change a key's limits (0 removes one); running servers apply it within a second or two."""

    chosen = chosen_limits(options)

    async def update(session: AsyncSession) -> tuple[tables.ApiKey | None, dict[str, int | None]]:
        key = await find(session, key_or_id)
        if key is None:
            return None, {}
        before = {name: getattr(key, name) for name in chosen}
        return await queries.update_limits(session, key, chosen), before

    key, before = with_session(update)
    if key is None:
        raise click.ClickException("No such key.")
    changes = [
        f"{limit_name(name)} {limit_value(name, old)} → {limit_value(name, getattr(key, name))}"
        for name, old in before.items()
        if (old or None) != (getattr(key, name) or None)
    ]
    click.echo(f"Updated {key.id}: {', '.join(changes)}." if changes else f"Nothing changed for {key.id}.")


@keys.command("webhook")
@click.argument("key_or_id")
@click.option("--url", default=None, help="Where the key's jobs report by default (https, public).")
@click.option("--no-url", is_flag=True, help="No default target: only jobs that name one report.")
@click.option("--rotate-secret", is_flag=True, help="Make a new signing secret; the old one stops working.")
def key_webhook(key_or_id: str, url: str | None, no_url: bool, rotate_secret: bool) -> None:
    """Set a key's webhooks. Its signing secret is made with its first target (or --rotate-secret) and
    shown once: give it to the key's owner, whose receiver checks our signatures with it."""
    settings = Settings()

    async def configure(session: AsyncSession) -> tuple[tables.ApiKey | None, str | None]:
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
    """List keys (prefix only; full keys are never stored) with their limits and budgets."""
    rows = [
        (
            k.id,
            k.prefix + "…",
            "test" if k.test else "live",
            k.name,
            f"{k.created_at:%Y-%m-%d %H:%M}",
            describe_limits(k),
            "revoked" if k.revoked_at else "active",
        )
        for k in with_session(queries.list_keys)
    ]
    print_table(("ID", "KEY", "KIND", "NAME", "CREATED", "LIMITS", "STATUS"), rows)


@keys.command("revoke")
@click.argument("key_or_id")
def revoke_key(key_or_id: str) -> None:
    """Revoke a key, given the full key or its id."""

    async def revoke(session: AsyncSession) -> tuple[tables.ApiKey | None, datetime | None]:
        key = await find(session, key_or_id)
        if key is None or key.revoked_at is not None:
            return key, None if key is None else key.revoked_at
        return await queries.revoke_key(session, key_id=key.id), None

    key, earlier = with_session(revoke)
    if key is None:
        raise click.ClickException("No such key.")
    if earlier is not None:
        click.echo(f"{key.id} ({key.prefix}…) was already revoked, on {earlier:%Y-%m-%d %H:%M} UTC.")
    else:
        click.echo(f"Revoked {key.id} ({key.prefix}…).")
