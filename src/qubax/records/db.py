"""Opening the database: the engine (SQLite tuned as the ledger's writer tunes it, PostgreSQL with time
limits), its migrations, its sessions, and the translation of a database that cannot be reached or written
into `DatabaseUnavailable` (a 503 that says when to come back) for every statement, wherever it runs.

The tables are in `tables`, the queries several modules share in `queries`."""

import os
import sqlite3
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Dialect, ExceptionContext
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from qubax.errors import DatabaseUnavailable
from qubax.records import sqlite_writer


def connect(url: str) -> AsyncEngine:
    if not url.startswith("sqlite"):
        # A server that stops answering (frozen, or a host gone from the network) must not hold requests
        # for asyncpg's 60 s connect default, or for ever mid-statement: every statement here is a small
        # indexed one or a batch of inserts.
        engine = create_async_engine(
            url, connect_args={"timeout": CONNECT_SECONDS, "command_timeout": STATEMENT_SECONDS}
        )
        event.listen(engine.sync_engine, "do_connect", connect_or_fail)
        event.listen(engine.sync_engine, "handle_error", unavailable)
        return engine
    path = url.split(":///", 1)[-1]
    if path and path != ":memory:":
        # Keys' digests and everyone's usage: readable by the service's user only. SQLite gives its
        # -wal and -shm files the database file's permissions.
        Path(path).parent.mkdir(mode=PRIVATE_FOLDER, parents=True, exist_ok=True)
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, PRIVATE_FILE))
    engine = create_async_engine(url)
    event.listen(engine.sync_engine, "connect", tune_sqlite)
    event.listen(engine.sync_engine, "handle_error", unavailable)
    return engine


CONNECT_SECONDS, STATEMENT_SECONDS = 5.0, 15.0

# PostgreSQL's SQLSTATE classes for a failing server rather than a failing statement: the connection
# (08), resources such as the disk or connection slots (53), a shutdown or start under way (57P).
POSTGRESQL_FAILURES = ("08", "53", "57P")
SQLITE_FAILURES = {sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_BUSY, sqlite3.SQLITE_CANTOPEN}


def connect_or_fail(dialect: Dialect, record: Any, args: Any, options: Any) -> Any:
    """A new connection, made as SQLAlchemy would; the driver's network errors (refused, timed out),
    which SQLAlchemy hands on untouched and without calling `unavailable`, become ours too."""
    try:
        return dialect.connect(*args, **options)
    except OSError as exc:  # TimeoutError included
        raise DatabaseUnavailable(UNAVAILABLE) from exc


UNAVAILABLE = "The database is unavailable, so the server could not complete the request; try again shortly."


def unavailable(context: ExceptionContext) -> None:
    """SQLAlchemy's hook for every database error, on any session or connection: a database that cannot
    be reached or written becomes ours, a 503 that says when to come back, instead of a crash (500)."""
    error = context.original_exception
    if not isinstance(error, Exception):
        # A cancellation (a node stopping, a client gone) reaches this hook as a "disconnect": made ours,
        # it would be caught as a database that is away, and the cancelled work would go on.
        return
    state = getattr(error, "sqlstate", None)
    failing = (
        context.is_disconnect
        or isinstance(error, OSError)
        or (isinstance(state, str) and state.startswith(POSTGRESQL_FAILURES))
        or getattr(error, "sqlite_errorcode", 0) & 0xFF in SQLITE_FAILURES  # the primary code of an extended one
    )
    if failing:
        raise DatabaseUnavailable(UNAVAILABLE) from error


def tune_sqlite(connection: Any, record: Any) -> None:
    """The same settings as the ledger's helper process (`sqlite_writer.PRAGMAS` says why)."""
    cursor = connection.cursor()
    for pragma in sqlite_writer.PRAGMAS:
        cursor.execute(pragma)
    cursor.close()


async def migrate(engine: AsyncEngine) -> None:
    """Bring the schema to the newest migration (Alembic, run in-process)."""
    async with engine.begin() as connection:
        await connection.run_sync(_upgrade)


def _upgrade(connection: Connection) -> None:
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


def sessions(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


PRIVATE_FOLDER, PRIVATE_FILE = 0o700, 0o600  # what the data folder and its files are created with
