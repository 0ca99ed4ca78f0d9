import sys

import pytest
from pydantic import SecretStr

from qubax.client import Client
from qubax.providers.registry import PROVIDERS, build_providers, credentials, default_concurrency
from qubax.settings import Settings
from qubax.slots import LocalSlots


@pytest.mark.anyio
async def test_comma_separated_keys_become_a_pool_with_the_catalog_cap(settings: Settings) -> None:
    settings.bfl_api_key = SecretStr(" key-1, key-2 ,,")
    settings.fal_key = SecretStr("fal-1")
    async with Client() as http:
        providers = build_providers(settings, http, {"bfl": 3}, LocalSlots())
    assert set(providers) == {"bfl", "fal"}
    upstream = providers["bfl"].upstream  # type: ignore[attr-defined]
    assert upstream.pool.keys == ["key-1", "key-2"]
    assert upstream.pool.limit == 3
    assert providers["fal"].upstream.pool.limit == sys.maxsize  # type: ignore[attr-defined]


def test_credentials_and_defaults(settings: Settings) -> None:
    assert credentials(settings, "openai") == []
    settings.openai_api_key = SecretStr("sk-1")
    assert credentials(settings, "openai") == ["sk-1"]
    assert default_concurrency()["bfl"] == 24
    assert set(PROVIDERS) == {"bfl", "fal", "replicate", "together", "openai"}
