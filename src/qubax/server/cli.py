"""The `qubax` command (the package's entry point): the group, `serve`, and the other commands registered
on it from key_commands (`keys`), operator_commands (`models`, `usage`, `jobs`) and client (`generate`)."""

import asyncio
import logging
import logging.config
from typing import Any

import click

from qubax.providers.registry import PROVIDERS, credentials
from qubax.server import logs
from qubax.server.client import generate
from qubax.server.key_commands import keys
from qubax.server.operator_commands import enabling, jobs, models, open_catalog, usage

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
    from qubax.server.allocator import keep_large_buffers
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
    keep_large_buffers()  # and this
    connections = settings.max_connections or connection_bound(descriptors)
    logger.info("client connections: %d at once per process (file-descriptor limit %d)", connections, descriptors)
    # Qubax writes the access log itself (with the request id, never a query string): uvicorn's is off.
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "log_config": log_config,
        "access_log": False,
        "http": GuardedConnection,  # the connection limits (docs/security.md "Running on the internet")
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


main.add_command(keys)
main.add_command(models)
main.add_command(usage)
main.add_command(jobs)
main.add_command(generate)
