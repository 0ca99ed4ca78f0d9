"""The whole system for end-to-end tests: our app in front of fake upstreams, all over loopback HTTP."""

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import openai
from pydantic import SecretStr
from sqlalchemy import select

from qubax import db
from qubax.app import create_app
from qubax.settings import Settings
from tests.conftest import create_key
from tests.fakes.bfl import FakeBFL
from tests.fakes.openai import FakeOpenAI
from tests.fakes.together import FakeTogether
from tests.server import serve

Row = TypeVar("Row", db.Generation, db.Attempt)


@dataclass
class Stack:
    bfl: FakeBFL
    together: FakeTogether
    openai: FakeOpenAI
    url: str  # our app
    live: openai.OpenAI
    test: openai.OpenAI
    settings: Settings
    live_key: str


@contextlib.contextmanager
def running_stack(settings: Settings, catalog: str | None = None, **changes: Any) -> Iterator[Stack]:
    """Fakes for BFL, Together and OpenAI with credentials pointing at them, then our app."""
    bfl, together, oai = FakeBFL(), FakeTogether(), FakeOpenAI()
    if catalog is not None:
        settings.catalog = settings.data_dir.parent / "catalog.toml"
        settings.catalog.write_text(catalog)
    with serve(bfl.app) as bfl_url, serve(together.app) as together_url, serve(oai.app) as openai_url:
        settings.bfl_base_url, settings.bfl_api_key = bfl_url, SecretStr("test-key")
        settings.together_base_url, settings.together_api_key = together_url + "/v1", SecretStr("test-key")
        settings.openai_base_url, settings.openai_api_key = openai_url + "/v1", SecretStr("test-key")
        for name, value in changes.items():  # after the fakes' URLs, so a test can point one elsewhere
            setattr(settings, name, value)
        live, test = create_key(settings), create_key(settings, test=True)
        with serve(create_app(settings)) as url:
            yield Stack(bfl, together, oai, url, client(url, live), client(url, test), settings, live)


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
