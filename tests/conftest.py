import os

import pytest

# Provider credentials from the developer's shell must never leak into tests.
PROVIDER_ENV = ("BFL_API_KEY", "OPENAI_API_KEY", "TOGETHER_API_KEY", "FAL_KEY", "REPLICATE_API_TOKEN")


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("QUBAX_") or name in PROVIDER_ENV:
            monkeypatch.delenv(name)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
