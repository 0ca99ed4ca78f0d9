"""The whole system for end-to-end tests: our app in front of fake upstreams, all over loopback HTTP."""

import asyncio
import base64
import contextlib
import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import openai
from PIL import Image
from pydantic import SecretStr
from sqlalchemy import select

from qubax.app import create_app
from qubax.records import db, tables
from qubax.server.settings import Settings
from tests.conftest import create_key
from tests.fakes.bfl import FakeBFL
from tests.fakes.fal import FakeFal
from tests.fakes.openai import FakeOpenAI
from tests.fakes.replicate import FakeReplicate
from tests.fakes.together import FakeTogether
from tests.server import serve

Row = TypeVar("Row", bound=tables.Base)


@dataclass
class Stack:
    bfl: FakeBFL
    together: FakeTogether
    openai: FakeOpenAI
    fal: FakeFal
    replicate: FakeReplicate
    url: str  # our app
    live: openai.OpenAI
    test: openai.OpenAI
    settings: Settings
    live_key: str


@contextlib.contextmanager
def running_stack(
    settings: Settings,
    catalog: str | None = None,
    providers: tuple[str, ...] = ("bfl", "together", "openai"),
    base_urls: dict[str, str] | None = None,
    **changes: Any,
) -> Iterator[Stack]:
    """A fake for every upstream, credentials set for `providers` only, then our app."""
    bfl, together, oai, fal, replicate = FakeBFL(), FakeTogether(), FakeOpenAI(), FakeFal(), FakeReplicate()
    if catalog is not None:
        settings.catalog = settings.data_dir.parent / "catalog.toml"
        settings.catalog.write_text(catalog)
    with contextlib.ExitStack() as running:
        urls = {
            "bfl": running.enter_context(serve(bfl.app)),
            "together": running.enter_context(serve(together.app)) + "/v1",
            "openai": running.enter_context(serve(oai.app)) + "/v1",
            "fal": running.enter_context(serve(fal.app)),
            "replicate": running.enter_context(serve(replicate.app)) + "/v1",
        }
        for name in providers:
            settings.base_urls[name] = urls[name]
            settings.credentials[name] = SecretStr("test-key")
        settings.base_urls.update(base_urls or {})  # after the fakes' URLs, so a test can point one elsewhere
        for name, value in changes.items():
            setattr(settings, name, value)
        live, test = create_key(settings), create_key(settings, test=True)
        url = running.enter_context(serve(create_app(settings)))
        yield Stack(bfl, together, oai, fal, replicate, url, client(url, live), client(url, test), settings, live)


def client(url: str, key: str, retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url=url + "/v1", max_retries=retries)


def rows(settings: Settings, table: type[Row]) -> list[Row]:
    """Every row of a table, in insertion order."""

    async def load() -> list[Row]:
        engine = db.connect(settings.resolved_database_url)
        async with db.sessions(engine)() as session:
            found = list(await session.scalars(select(table)))
        await engine.dispose()
        return found

    return asyncio.run(load())


def add(settings: Settings, *new: tables.Base) -> None:
    """Write rows straight to the database, as another node (or a dead one) would have."""

    async def write() -> None:
        engine = db.connect(settings.resolved_database_url)
        async with db.sessions(engine)() as session:
            session.add_all(new)
            await session.commit()
        await engine.dispose()

    asyncio.run(write())


def png(width: int, height: int, color: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, "PNG")
    return out.getvalue()


def picture(b64: str | None) -> tuple[str | None, tuple[int, int]]:
    """The format and size of an image an answer carried inline."""
    image = Image.open(io.BytesIO(base64.b64decode(b64 or "")))
    return image.format, image.size


def charged(stack: Stack) -> list[tuple[str, str, int, int]]:
    """Each request's usage record: the upstreams that served it, its outcome, its images, its cost."""
    return [(g.upstream, g.outcome, g.images, g.cost_micros) for g in rows(stack.settings, tables.Generation)]
