import sys
from pathlib import Path

import openai
import pytest
from pydantic import SecretStr

from qubax.app import create_app
from qubax.limits.slots import LocalSlots
from qubax.providers import ProviderInfo
from qubax.providers.openai import OpenAI
from qubax.providers.registry import PROVIDERS, build_providers, credentials, default_concurrency
from qubax.providers.transport import open_session
from qubax.server.settings import Settings
from tests.conftest import create_key
from tests.fakes.openai import FakeOpenAI
from tests.server import serve


@pytest.mark.anyio
async def test_comma_separated_keys_become_a_pool_with_the_catalog_cap(settings: Settings) -> None:
    settings.credentials["bfl"] = SecretStr(" key-1, key-2 ,,")
    settings.credentials["fal"] = SecretStr("fal-1")
    async with open_session() as http:
        providers = build_providers(settings, http, {"bfl": 3}, LocalSlots())
    assert set(providers) == {"bfl", "fal"}
    upstream = providers["bfl"].upstream  # type: ignore[attr-defined]
    assert upstream.pool.keys == ["key-1", "key-2"]
    assert upstream.pool.limit == 3
    assert providers["fal"].upstream.pool.limit == sys.maxsize  # type: ignore[attr-defined]


def test_credentials_and_defaults(settings: Settings) -> None:
    assert credentials(settings, "openai") == []
    settings.credentials["openai"] = SecretStr("sk-1")
    assert credentials(settings, "openai") == ["sk-1"]
    assert default_concurrency()["bfl"] == 24
    assert set(PROVIDERS) == {"bfl", "fal", "replicate", "together", "openai", "byteplus", "google"}


def test_a_new_provider_is_one_info_and_one_registry_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A test-only provider, registered here: its own variables configure it, and nothing in Settings
    names it. (It speaks the OpenAI-compatible protocol, so the OpenAI adapter serves it.)"""
    acme = ProviderInfo(name="acme", build=OpenAI, credential="ACME_API_KEY", base_url="https://api.acme.invalid/v1")
    monkeypatch.setitem(PROVIDERS, "acme", acme)
    fake = FakeOpenAI(api_key="acme-key")
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(
        '[models."acme-image"]\nlike = "dall-e-3"\nroutes = [{ provider = "acme", model = "dall-e-3" }]\n'
    )
    with serve(fake.app) as upstream:
        monkeypatch.setenv("ACME_API_KEY", "acme-key")
        monkeypatch.setenv("QUBAX_ACME_BASE_URL", f"{upstream}/v1")
        settings = Settings(data_dir=tmp_path / "data", catalog=catalog)
        assert not [name for name in Settings.model_fields if "acme" in name]
        assert credentials(settings, "acme") == ["acme-key"]
        key = create_key(settings)
        with serve(create_app(settings)) as url:
            client = openai.OpenAI(api_key=key, base_url=f"{url}/v1", max_retries=0)
            response = client.images.with_raw_response.generate(model="acme-image", prompt="a red barn")
    assert response.headers["x-qubax-route"] == "acme"
    assert response.parse().data[0].url is not None
    assert [body["prompt"] for body in fake.requests] == ["a red barn"]
