"""What `qubax serve` checks before it starts: each configuration mistake becomes one or two lines that
name the variable, say what is wrong and what to do, instead of a traceback from deep inside a library.

The same checks leave the database migrated, once, before any worker starts."""

import asyncio
import contextlib
import logging
import tempfile
import urllib.parse
from typing import Any

from pydantic import ValidationError
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

from qubax.errors import DatabaseUnavailable, QubaxError
from qubax.limits.slots import open_slots
from qubax.records import db
from qubax.server.masking import Mask, configured_secrets
from qubax.server.services import open_storage
from qubax.server.settings import Settings

CHECK_SECONDS = 15.0  # for each service to answer
SECRET_FIELDS = {"admin_token", "signing_secret", "credentials"}


class StartupError(Exception):
    """A configuration mistake, said in a line or two for the operator."""


def read_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        raise StartupError("\n".join(describe(error) for error in exc.errors()[:2])) from None


def describe(error: Any) -> str:
    """One pydantic error, said in terms of the environment variable the operator set."""
    field = str(error["loc"][0]) if error.get("loc") else ""
    given = "" if field in SECRET_FIELDS else f"={error.get('input')!r}"
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    if error.get("type") in ("too_short", "string_too_short"):  # pydantic says "items" of a secret
        message = f"must be at least {error['ctx']['min_length']} characters (e.g. `openssl rand -hex 32`)"
    return f"QUBAX_{field.upper()}{given}: {message}."


# A service's client module: the extra that installs it, and the variable that asks for the service.
EXTRAS = {
    "asyncpg": ("postgres", "QUBAX_DATABASE_URL"),
    "redis": ("redis", "QUBAX_REDIS_URL"),
    "aiobotocore": ("s3", "QUBAX_STORAGE_URL"),
    "botocore": ("s3", "QUBAX_STORAGE_URL"),
}


async def check(settings: Settings) -> None:
    """Every service the configuration names, reachable and usable; raise `StartupError` otherwise."""
    mask = Mask(configured_secrets(settings))
    check_data_dir(settings)
    try:
        await check_database(settings, mask)
        await check_storage(settings, mask)
        await check_redis(settings, mask)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in EXTRAS:
            raise
        extra, variable = EXTRAS[(exc.name or "").split(".")[0]]
        raise StartupError(
            f"{variable} needs the {extra} client, which is not installed: pip install 'qubax[{extra}]' "
            f"(./qubax installs it by itself when {variable} is set)."
        ) from None


async def check_redis(settings: Settings, mask: Mask) -> None:
    if not settings.redis_url:
        return
    try:
        async with asyncio.timeout(CHECK_SECONDS), open_slots(settings.redis_url, 60):
            pass
    except (RuntimeError, OSError, TimeoutError) as exc:
        reason = mask(str(exc.__cause__ or exc) or "no answer").rstrip(".")
        raise StartupError(f"QUBAX_REDIS_URL: cannot reach Redis ({reason}). Is it running there?") from None


async def check_storage(settings: Settings, mask: Mask) -> None:
    quiet = logging.getLogger("qubax.s3")
    quiet.disabled = True  # it would log the failure too; the error below says it in one line
    try:
        async with asyncio.timeout(CHECK_SECONDS), open_storage(settings) as storage:
            await storage.ready()
    except ValueError as exc:
        raise StartupError(f"QUBAX_STORAGE_URL={settings.storage_url!r}: {exc}") from None
    except (QubaxError, TimeoutError) as exc:
        reason = mask(str(exc.__cause__ or exc) or "no answer")
        raise StartupError(
            f"QUBAX_STORAGE_URL={settings.storage_url!r}: cannot use the image store ({reason}). Check the "
            "bucket's name, AWS_ENDPOINT_URL and the credentials (AWS_ACCESS_KEY_ID, AWS_PROFILE)."
        ) from None
    finally:
        quiet.disabled = False


def check_data_dir(settings: Settings) -> None:
    """The data folder holds whatever is not configured elsewhere: the SQLite file, images, the signing key."""
    if settings.database_url and settings.storage_url and settings.signing_secret:
        return  # nothing lives there
    folder = settings.data_dir
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise StartupError(
            f"QUBAX_DATA_DIR={str(folder)!r}: cannot write there ({exc.strerror or exc}). "
            "Point it at a folder this user can write, or fix the folder's permissions."
        ) from None


async def check_database(settings: Settings, mask: Mask) -> None:
    url = settings.resolved_database_url
    parts = urllib.parse.urlsplit(url)
    where = f"{parts.hostname}:{parts.port or 5432}" if parts.hostname else url.split("///", 1)[-1]
    try:
        engine = db.connect(url)
    except ModuleNotFoundError as exc:
        if (exc.name or "") in EXTRAS:
            raise  # a client of ours that is not installed: `check` says which extra brings it
        raise StartupError(
            f"QUBAX_DATABASE_URL: cannot open {parts.scheme or url!r} URLs ({mask(str(exc))}). "
            "Use postgresql+asyncpg://USER:PASSWORD@HOST/DATABASE, or leave it unset for SQLite."
        ) from None
    except (ArgumentError, NoSuchModuleError, SQLAlchemyError) as exc:
        raise StartupError(
            f"QUBAX_DATABASE_URL: cannot open {parts.scheme or url!r} URLs ({mask(str(exc))}). "
            "Use postgresql+asyncpg://USER:PASSWORD@HOST/DATABASE, or leave it unset for SQLite."
        ) from None
    try:
        async with asyncio.timeout(CHECK_SECONDS):
            await db.migrate(engine)
    except (OSError, TimeoutError, SQLAlchemyError, DatabaseUnavailable) as exc:
        cause = exc.__cause__ if isinstance(exc, DatabaseUnavailable) and exc.__cause__ else exc  # the driver's words
        reason = mask(f"{type(cause).__name__}: {cause}".splitlines()[0]) if str(cause) else type(cause).__name__
        raise StartupError(
            f"QUBAX_DATABASE_URL: cannot use the database at {where} ({reason}). "
            "Is it running, and does the URL name the right host, port, user, password and database?"
        ) from None
    except Exception as exc:  # drivers raise their own kinds (asyncpg's for a wrong password, say)
        reason = mask(f"{type(exc).__name__}: {exc}".splitlines()[0])
        raise StartupError(f"QUBAX_DATABASE_URL: the database at {where} refused us ({reason}).") from None
    finally:
        with contextlib.suppress(Exception):
            await engine.dispose()
